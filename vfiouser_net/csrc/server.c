/* libvfio-user glue: the context thread's loop and every callback.
 *
 * Ownership: the vfio-user context belongs to the thread that runs
 * vn_server_run(); every libvfio-user call except vfu_irq_trigger happens
 * there. Workers are paused through the quiesce callback before libvfio-user
 * maps or unmaps guest memory or resets the device, and resumed when
 * vfu_run_ctx() returns. vfu_irq_trigger() writes an eventfd that a SET_IRQS
 * message may close and replace: the loop holds irq_lock for writing while it
 * processes a message and workers only trigger under the read lock (see
 * vn_irq_raise). */
#include "server.h"

#include <errno.h>
#include <linux/pci_regs.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <syslog.h>

#include "ctrl.h"
#include "device.h"
#include "irq.h"
#include "layout.h"
#include "le.h"
#include "libvfio-user.h"
#include "log.h"
#include "mem_guard.h"

static struct vn_dev *dev_of(vfu_ctx_t *ctx)
{
    return vfu_get_private(ctx);
}

static ssize_t bar0_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset, bool is_write)
{
    struct vn_dev *dev = dev_of(ctx);
    if (offset < 0 || count == 0 || count > 8 || (uint64_t)offset + count > VN_BAR0_SIZE) {
        errno = EINVAL;
        return -1;
    }
    if (offset >= VN_NOTIFY_OFF && offset < VN_NOTIFY_OFF + VN_NOTIFY_LEN) {
        if (is_write) {
            /* The queue is given by the address (notify_off_multiplier 4);
             * the value written (the queue index) is not trusted. */
            vn_dev_doorbell(dev, (unsigned)(offset - VN_NOTIFY_OFF) / VN_NOTIFY_MULTIPLIER);
        } else {
            memset(buf, 0, count);
        }
        return (ssize_t)count;
    }
    if (offset >= VN_STEER_STATE_OFF &&
        (uint64_t)offset + count <= VN_STEER_STATE_OFF + VN_STEER_STATE_LEN) {
        /* Read-only: a write is ignored, as for any read-only register. */
        if (!is_write) {
            uint8_t state[VN_STEER_STATE_LEN];
            vn_dev_steer_state(dev, state);
            memcpy(buf, state + (offset - VN_STEER_STATE_OFF), count);
        }
        return (ssize_t)count;
    }
    if (dev->hooks.bar_access == NULL) {
        memset(buf, 0, is_write ? 0 : count);
        return (ssize_t)count;
    }
    int r = dev->hooks.bar_access(dev->hooks.py, (uint64_t)offset, (uint8_t *)buf, (uint32_t)count,
                                  is_write);
    if (r < 0) {
        errno = EINVAL;
        return -1;
    }
    return (ssize_t)count;
}

/* -- configuration space ---------------------------------------------------
 *
 * libvfio-user serves the header and the capabilities it knows; what it
 * hands us is the VIRTIO_PCI_CAP_PCI_CFG capability (virtio 1.x 4.1.4.9:
 * "The device MUST present at least one"), the one way into BAR0 for a
 * driver that cannot map it (iPXE, firmware), and the bytes outside every
 * capability, read-only (writes are ignored, as PCI wants). */

/* struct virtio_pci_cfg_cap: a virtio_pci_cap, then pci_cfg_data[4]. */
#define CFG_CAP_BAR 4
#define CFG_CAP_OFFSET 8
#define CFG_CAP_LENGTH 12
#define CFG_CAP_DATA 16
#define CFG_CAP_LEN 20
#define VIRTIO_PCI_CAP_PCI_CFG 5

static bool cfg_cap_writable(size_t i)
{
    /* bar, offset, length and the data window are the driver's (RW); the
     * header, id and padding are read-only. */
    return i == CFG_CAP_BAR || (i >= CFG_CAP_OFFSET && i < CFG_CAP_LEN);
}

static ssize_t bar0_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset, bool is_write);

/* The BAR access cap.bar/offset/length describe, through pci_cfg_data;
 * false when the driver set them against the spec's rules (4.1.4.9.1). */
static bool cfg_cap_window(struct vn_dev *dev, uint8_t *cap, bool is_write)
{
    uint32_t off = vn_le32_get(cap + CFG_CAP_OFFSET);
    uint32_t len = vn_le32_get(cap + CFG_CAP_LENGTH);
    /* A window never set up (length 0, as after reset) is no access: a
     * dump of configuration space (lspci -xxx) reads pci_cfg_data too. */
    if (len == 0)
        return false;
    if (cap[CFG_CAP_BAR] != 0 || (len != 1 && len != 2 && len != 4) || off % len != 0 ||
        (uint64_t)off + len > VN_BAR0_SIZE) {
        VN_STAT_INC(dev->st.pci_cfg_invalid);
        vn_log(dev, LOG_WARNING,
               "PCI_CFG %s refused: BAR %u offset 0x%x length %u (BAR 0, length 1, 2 or 4, "
               "aligned, inside the BAR)",
               is_write ? "write" : "read", cap[CFG_CAP_BAR], off, len);
        return false;
    }
    return bar0_access(dev->vfu, (char *)cap + CFG_CAP_DATA, len, off, is_write) == (ssize_t)len;
}

static ssize_t cfg_cap_access(struct vn_dev *dev, uint8_t *cap, char *buf, size_t count,
                              size_t rel, bool is_write)
{
    bool data = rel + count > CFG_CAP_DATA;
    if (is_write) {
        for (size_t i = 0; i < count; i++)
            if (cfg_cap_writable(rel + i))
                cap[rel + i] = (uint8_t)buf[i];
        if (data && !cfg_cap_window(dev, cap, true))
            memset(cap + CFG_CAP_DATA, 0, 4);
        return (ssize_t)count;
    }
    if (data && !cfg_cap_window(dev, cap, false))
        memset(cap + CFG_CAP_DATA, 0, 4);
    memcpy(buf, cap + rel, count);
    return (ssize_t)count;
}

static ssize_t cfg_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset, bool is_write)
{
    struct vn_dev *dev = dev_of(ctx);
    uint8_t *cfg = vfu_pci_get_config_space(ctx)->raw;
    if (offset < 0 || count == 0 || (uint64_t)offset + count > PCI_CFG_SPACE_SIZE) {
        errno = EINVAL;
        return -1;
    }
    size_t pos = dev->pci_cfg_cap_pos, off = (size_t)offset;
    if (pos != 0 && off >= pos && off + count <= pos + CFG_CAP_LEN)
        return cfg_cap_access(dev, cfg + pos, buf, count, off - pos, is_write);
    if (!is_write)
        memcpy(buf, cfg + off, count);
    return (ssize_t)count;
}

static int add_pci_cfg_cap(struct vn_dev *dev, vfu_ctx_t *ctx)
{
    uint8_t cap[CFG_CAP_LEN] = { PCI_CAP_ID_VNDR, 0, CFG_CAP_LEN, VIRTIO_PCI_CAP_PCI_CFG };
    if (vfu_setup_region(ctx, VFU_PCI_DEV_CFG_REGION_IDX, PCI_CFG_SPACE_SIZE, cfg_access,
                         VFU_REGION_FLAG_RW, NULL, 0, -1, 0) < 0)
        return -errno;
    ssize_t pos = vfu_pci_add_capability(ctx, 0, VFU_CAP_FLAG_CALLBACK, cap);
    if (pos < 0)
        return -errno;
    dev->pci_cfg_cap_pos = (size_t)pos;
    return 0;
}

/* The driver's MSI-X enable bit, for the workers, and with MSI-X off the
 * Interrupt Status bit of the PCI Status register as the OR of the ISR bits
 * (4.1.4.5). Context thread, with irq_lock held for writing (no interrupt is
 * being sent meanwhile), before and after every message: a worker's ISR bit
 * shows from the next message on. */
static void sync_interrupt_state(struct vn_dev *dev)
{
    if (dev->msix_cap_pos == 0)
        return;
    uint8_t *cfg = vfu_pci_get_config_space(dev->vfu)->raw;
    bool on = (vn_le16_get(cfg + dev->msix_cap_pos + PCI_MSIX_FLAGS) & PCI_MSIX_FLAGS_ENABLE) != 0;
    atomic_store(&dev->msix_on, on);
    bool pending = !on && atomic_load(&dev->isr) != 0;
    cfg[PCI_STATUS] = (uint8_t)((cfg[PCI_STATUS] & ~PCI_STATUS_INTERRUPT) |
                                (pending ? PCI_STATUS_INTERRUPT : 0));
}

/* QEMU emulates the MSI-X table and PBA itself; accesses that still reach
 * us read as zero and are otherwise ignored. */
static ssize_t msix_bar_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset, bool is_write)
{
    (void)ctx;
    if (offset < 0 || (uint64_t)offset + count > VN_MSIX_BAR_SIZE) {
        errno = EINVAL;
        return -1;
    }
    if (!is_write)
        memset(buf, 0, count);
    return (ssize_t)count;
}

/* Why a mapped region cannot be used, or NULL. libvfio-user (with our
 * patches) already refuses these; checked again here because a mistake in
 * either is an access outside guest memory. */
static const char *dma_region_problem(const vfu_dma_info_t *info)
{
    uintptr_t map = (uintptr_t)info->mapping.iov_base;
    uintptr_t start = (uintptr_t)info->vaddr;
    size_t len = info->iova.iov_len;
    if (!(info->prot & PROT_READ))
        return "not readable";
    if (len == 0 || start < map || start - map > info->mapping.iov_len ||
        len > info->mapping.iov_len - (start - map))
        return "registered range outside its mapping";
    return NULL;
}

static void dma_refuse(struct vn_dev *dev, uint64_t gpa, size_t len, const char *why)
{
    dev->dma_refused_own++;
    vn_log(dev, LOG_ERR, "DMA region 0x%llx+0x%zx refused: %s", (unsigned long long)gpa, len, why);
}

static void dma_register(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
    struct vn_dev *dev = dev_of(ctx);
    uint64_t gpa = (uint64_t)(uintptr_t)info->iova.iov_base;
    size_t len = info->iova.iov_len;
    VN_STAT_INC(dev->st.dma_maps);
    if (info->vaddr == NULL) {
        /* QEMU maps ROM/BIOS areas without a file; only RAM matters, and
         * rings or buffers outside mapped memory are reported when used. */
        vn_log(dev, LOG_DEBUG, "DMA region 0x%llx+0x%zx has no file: not mappable",
               (unsigned long long)gpa, len);
        return;
    }
    const char *why = dma_region_problem(info);
    if (why != NULL) {
        dma_refuse(dev, gpa, len, why);
        return;
    }
    int r = vn_mem_guard_add(info->mapping.iov_base, info->mapping.iov_len, info->page_size,
                             &dev->st.guest_mem_faults, dev->cmd_fd);
    if (r < 0) {
        dma_refuse(dev, gpa, len, "no guard slot left for it");
        return;
    }
    r = vn_mem_add(&dev->mem, gpa, len, info->vaddr, (info->prot & PROT_WRITE) != 0);
    if (r < 0) {
        vn_mem_guard_remove(info->mapping.iov_base);
        dma_refuse(dev, gpa, len, strerror(-r));
        return;
    }
    vn_log(dev, LOG_DEBUG, "DMA region 0x%llx+0x%zx mapped", (unsigned long long)gpa, len);
}

static void dma_unregister(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
    struct vn_dev *dev = dev_of(ctx);
    VN_STAT_INC(dev->st.dma_unmaps);
    if (vn_mem_remove(&dev->mem, (uint64_t)(uintptr_t)info->iova.iov_base, info->iova.iov_len) == 0)
        vn_mem_guard_remove(info->mapping.iov_base);
}

/* A guest whose memory file shrank under a mapped region (mem_guard.h): its
 * device can no longer trust what it reads there. */
static void check_mem_faults(struct vn_dev *dev)
{
    uint64_t faults = VN_STAT_LOAD(dev->st.guest_mem_faults);
    if (faults == dev->mem_faults_seen)
        return;
    dev->mem_faults_seen = faults;
    vn_dev_fatal(dev, "guest memory shrank under a DMA region (its file was truncated)");
}

static int quiesce(vfu_ctx_t *ctx)
{
    struct vn_dev *dev = dev_of(ctx);
    VN_STAT_INC(dev->st.quiesces);
    vn_dev_pause_workers(dev);
    return 0;
}

static int reset(vfu_ctx_t *ctx, vfu_reset_type_t type)
{
    struct vn_dev *dev = dev_of(ctx);
    /* The control plane logs and counts it (with its origin). */
    if (dev->hooks.reset != NULL)
        dev->hooks.reset(dev->hooks.py, (int)type);
    else
        vn_dev_reset(dev);
    return 0;
}

/* libvfio-user logs a line for every failed request and every interrupt it
 * has no eventfd for: rate limited with our own (vn_log). */
static void vfu_log_cb(vfu_ctx_t *ctx, int level, const char *msg)
{
    struct vn_dev *dev = dev_of(ctx);
    if (dev->hooks.log != NULL)
        vn_log(dev, level, "%s", msg);
}

int vn_server_setup(struct vn_dev *dev, void *vfu_ctx, int log_level)
{
    vfu_ctx_t *ctx = vfu_ctx;
    dev->vfu = ctx;
    int r = vn_mem_guard_install();
    if (r < 0)
        return r;
    if (vfu_setup_log(ctx, vfu_log_cb, log_level) < 0)
        return -errno;
    /* In polling mode only the notify area is mmappable (a sparse area):
     * the rest stays trapped, so config accesses still reach bar0_access. */
    struct iovec notify_area = { .iov_base = (void *)(uintptr_t)VN_NOTIFY_OFF,
                                 .iov_len = VN_NOTIFY_LEN };
    bool polled = dev->notify.map != NULL;
    if (vfu_setup_region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, VN_BAR0_SIZE, bar0_access,
                         VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM, polled ? &notify_area : NULL,
                         polled ? 1 : 0, polled ? dev->notify.fd : -1, 0) < 0)
        return -errno;
    if (vfu_setup_region(ctx, VFU_PCI_DEV_BAR4_REGION_IDX, VN_MSIX_BAR_SIZE, msix_bar_access,
                         VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM, NULL, 0, -1, 0) < 0)
        return -errno;
    if (vfu_setup_device_dma(ctx, dma_register, dma_unregister) < 0)
        return -errno;
    vfu_setup_device_quiesce_cb(ctx, quiesce);
    if (vfu_setup_device_reset_cb(ctx, reset) < 0)
        return -errno;
    if (vfu_setup_device_nr_irqs(ctx, VFU_DEV_MSIX_IRQ, 2 * dev->max_qps + 2) < 0)
        return -errno;
    if ((r = add_pci_cfg_cap(dev, ctx)) < 0)
        return r;
    ssize_t msix = vfu_pci_find_capability(ctx, false, PCI_CAP_ID_MSIX);
    dev->msix_cap_pos = msix > 0 ? (size_t)msix : 0;
    /* Off until the driver enables it (PCI: MSI-X starts disabled). */
    atomic_store(&dev->msix_on, dev->msix_cap_pos == 0);
    return 0;
}

void vn_server_stop(struct vn_dev *dev)
{
    eventfd_write(dev->stop_fd, 1);
}

static void after_messages(struct vn_dev *dev)
{
    /* A quiesce ends when vfu_run_ctx returns. */
    vn_dev_resume_workers(dev);
    vn_irq_flush_pending(dev);
    VN_STAT_STORE(dev->st.dma_refused, vfu_get_dma_refused(dev->vfu) + dev->dma_refused_own);
}

int vn_server_run(struct vn_dev *dev)
{
    vfu_ctx_t *ctx = dev->vfu;
    bool attached = false;
    unsigned accept_errors = 0;
    /* Named for top -H, perf and the SIGUSR2 dump: the thread that owns the
     * vfio-user context (and handles inline doorbells). */
    prctl(PR_SET_NAME, "vn-ctx", 0, 0, 0);
    for (;;) {
        struct pollfd pfd[3] = {
            { .fd = vfu_get_poll_fd(ctx), .events = POLLIN },
            { .fd = dev->stop_fd, .events = POLLIN },
            { .fd = dev->cmd_fd, .events = POLLIN },
        };
        /* Requests from the operator are applied here, on the thread that
         * owns the device, between messages. */
        vn_dev_apply_requested_policy(dev);
        vn_dev_apply_requested_taps(dev);
        check_mem_faults(dev);
        if (poll(pfd, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (pfd[1].revents & POLLIN)
            break;
        if (pfd[2].revents & POLLIN) {
            eventfd_t v;
            eventfd_read(dev->cmd_fd, &v);
            vn_dev_ctrl_poll_kick(dev);
            /* A control queue kept busy re-arms cmd_fd every time
             * (VN_CTRL_BUDGET): the client's messages go first. */
            if (pfd[0].revents == 0)
                continue;
        }
        if (!attached) {
            if (vfu_attach_ctx(ctx) < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                    continue;
                /* Not a transient condition (a broken listening socket):
                 * say so once a second at most, and do not spin. */
                if (accept_errors++ % 10 == 0)
                    vn_log(dev, LOG_ERR, "accepting a client failed: %s", strerror(errno));
                poll(NULL, 0, 100);
                continue;
            }
            accept_errors = 0;
            attached = true;
            if (dev->hooks.event != NULL)
                dev->hooks.event(dev->hooks.py, VN_EVENT_CONNECTED);
            continue;
        }
        int r;
        do {
            pthread_rwlock_wrlock(&dev->irq_lock);
            sync_interrupt_state(dev);
            r = vfu_run_ctx(ctx);
            sync_interrupt_state(dev);
            pthread_rwlock_unlock(&dev->irq_lock);
            after_messages(dev);
        } while (r > 0);
        if (r < 0 && errno != EAGAIN && errno != EINTR) {
            if (errno != ENOTCONN)
                vn_log(dev, LOG_WARNING, "client connection failed: %s", strerror(errno));
            /* libvfio-user has reset the device (LOST_CONN) and dropped the
             * client; accept the next one on the same socket. */
            attached = false;
            if (dev->hooks.event != NULL)
                dev->hooks.event(dev->hooks.py, VN_EVENT_DISCONNECTED);
        }
    }
    return 0;
}
