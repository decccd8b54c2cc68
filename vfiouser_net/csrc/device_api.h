/* The device as the control plane sees it: an opaque handle and the calls
 * on it (what vfiouser_net/decl/datapath.h declares to cffi). The device's
 * state and what the datapath's files share among themselves are in
 * device.h, which no caller outside the datapath needs; interrupts, the
 * server loop, the TAP and capture have their own headers (irq.h, server.h,
 * tap.h, capture.h). */
#ifndef VN_DEVICE_API_H
#define VN_DEVICE_API_H

#include <stdbool.h>
#include <stdint.h>

#include "coalesce.h"
#include "rss_hash.h"
#include "rx_filter.h"
#include "stats.h"
#include "steering.h"

/* The most queue pairs a device has (VN_VQ_MAX_SIZE, virtq.h, bounds a
 * ring). */
#define VN_MAX_QUEUE_PAIRS 16

struct vn_dev;

/* What the device tells the control plane through vn_hooks.event. */
enum vn_event {
    VN_EVENT_CONNECTED = 1,
    VN_EVENT_DISCONNECTED = 2,
    VN_EVENT_NEEDS_RESET = 3,
    VN_EVENT_CTRL = 4,
};

#define VN_CTRL_CLASS_SLOTS 10
#define VN_CTRL_CMD_SLOTS 8

struct vn_dev_stats {
    uint64_t ctrl_ok;
    uint64_t ctrl_err;
    uint64_t needs_reset;
    uint64_t doorbells_invalid;
    uint64_t dma_maps;
    uint64_t dma_unmaps;
    uint64_t quiesces;
    uint64_t irq_errors;
    uint64_t steering_switches;
    uint64_t steering_drain_timeouts;
    uint64_t tap_failures;       /* queues that found their TAP deleted */
    uint64_t tap_replacements;   /* TAPs re-attached after that */
    /* The control queue still had commands after VN_CTRL_BUDGET of them:
     * the context thread served its other work before going on. */
    uint64_t ctrl_budget_exhausted;
    uint64_t dma_refused;        /* DMA_MAPs refused (libvfio-user's and ours) */
    uint64_t guest_mem_faults;   /* accesses to guest memory its file no longer had */
    /* Interrupts not sent because the driver has MSI-X disabled: the ISR
     * status holds them (virtio 1.x 4.1.5.3; the device has no INTx pin). */
    uint64_t irqs_msix_off;
    /* VIRTIO_PCI_CAP_PCI_CFG accesses refused: a BAR other than 0, a
     * length other than 1, 2 or 4, an unaligned or out-of-range offset. */
    uint64_t pci_cfg_invalid;
    /* Frames for a receive queue being reset, sent to another pair instead
     * (virtio 1.x 5.1.6.5.6: "SHOULD re-select another random queue"). */
    uint64_t rx_reselected;
    /* Transmit doorbells handled on the context thread, the worker left
     * asleep (vn_qp_tx_inline). */
    uint64_t doorbells_inline;
    /* Inline passes that also placed received frames (the replies to what
     * they transmitted, usually), the worker still asleep (rx_inline). */
    uint64_t rx_inline;
    /* Control commands by class and command (class/command >= 7 fold into
     * 7) and result (0 ok, 1 error). */
    uint64_t ctrl_cmds[VN_CTRL_CLASS_SLOTS][VN_CTRL_CMD_SLOTS][2];
};

/* Hooks into the Python control plane, called on the context thread (and,
 * rarely and rate limited, log from workers). */

struct vn_hooks {
    void *py;
    /* BAR0 accesses outside the notify area: common/ISR/device config. */
    int (*bar_access)(void *py, uint64_t offset, uint8_t *buf, uint32_t count, int is_write);
    void (*reset)(void *py, int type);
    void (*log)(void *py, int level, const char *msg);
    void (*event)(void *py, int event);
};

/* Notify area inside BAR0: one 4-byte doorbell per queue. */
#define VN_NOTIFY_MULTIPLIER 4
struct vn_dev *vn_dev_new(unsigned max_qps, const uint8_t mac[6], uint32_t mtu);
void vn_dev_free(struct vn_dev *dev);
void vn_dev_set_hooks(struct vn_dev *dev, const struct vn_hooks *hooks);

/* Hand the TAP queue fd for pair qp (owned by the caller), before the
 * device runs. */
void vn_dev_set_tap(struct vn_dev *dev, unsigned qp, int fd);

/* Batched TAP writes through io_uring for every pair (tap_batch.h): 0, or
 * -errno and none (the kernel has no io_uring, or it is disabled). Before
 * the sandbox and before the workers start. */
int vn_dev_use_tap_batching(struct vn_dev *dev);

/* Every pair writes in batches (none gave up after an io_uring error). */
bool vn_dev_tap_batching(struct vn_dev *dev);

/* Swap in the queues of a re-created TAP while the device runs (any thread
 * but the context thread): the context thread pauses the workers, installs
 * them with the negotiated header length and offloads, and resumes. Returns
 * 0 once done (the old fds are then unused), -ETIMEDOUT after timeout_ms,
 * -EINVAL for a bad count. The fds stay the caller's: a request that timed
 * out is withdrawn before the call returns and is never installed, so the
 * caller may close them. One request at a time: a concurrent caller waits
 * (within its own timeout) for the pending one to be applied. */
int vn_dev_replace_taps(struct vn_dev *dev, const int *fds, unsigned n, unsigned timeout_ms);

/* Queue configuration from common config; qidx: rx0, tx0, ..., ctrl. */
int vn_dev_config_queue(struct vn_dev *dev, unsigned qidx, uint16_t size, uint64_t desc,
                        uint64_t avail, uint64_t used, uint16_t vector);

/* DRIVER_OK: map rings and start the workers. Returns 0, or -1 when a ring
 * is unusable (the caller sets DEVICE_NEEDS_RESET). */
int vn_dev_start(struct vn_dev *dev, uint64_t features);

/* Stop and join the workers and forget all queue state (device reset). */
void vn_dev_reset(struct vn_dev *dev);
void vn_dev_set_link(struct vn_dev *dev, bool up);
void vn_dev_set_announce(struct vn_dev *dev, bool on);
bool vn_dev_get_announce(struct vn_dev *dev);
bool vn_dev_get_needs_reset(struct vn_dev *dev);
void vn_dev_set_config_vector(struct vn_dev *dev, uint16_t vector);
void vn_dev_get_mac(struct vn_dev *dev, uint8_t mac_out[6]);
void vn_dev_get_filter(struct vn_dev *dev, struct vn_rx_filter *out);
/* The operator's steering policy (enum vn_policy), applied by the context
 * thread without a reset and without reordering (any thread). */
void vn_dev_request_policy(struct vn_dev *dev, int policy);

struct vn_steer_info {
    int policy;
    int effective;
    unsigned active_qps;
    unsigned max_qps;
    uint32_t epoch;
    bool rss_configured;
    uint32_t hash_types;
    unsigned table_len;
    unsigned unclassified;
    uint16_t table[VN_RSS_MAX_TABLE];
    unsigned key_len;
    uint8_t key[VN_RSS_MAX_KEY_SIZE];
};
void vn_dev_get_steering(struct vn_dev *dev, struct vn_steer_info *out);

/* Mark the device broken (DEVICE_NEEDS_RESET) and raise the config interrupt. */
void vn_dev_fatal(struct vn_dev *dev, const char *why);
/* The interrupt coalescing the driver set for queue qidx (NOTF_COAL). */
struct vn_coal_params vn_dev_get_coal(struct vn_dev *dev, unsigned qidx);

/* Doorbells through a polled shared page instead of vfio-user messages;
 * before vn_server_setup(). Returns 0 or -errno. */
int vn_dev_enable_notify_polling(struct vn_dev *dev);

/* After running out of work, a worker whose previous wait was shorter than
 * this keeps looking for up to this long before it asks for a doorbell and
 * sleeps: under load that saves a doorbell and a wake-up per batch, when idle
 * it costs nothing (0: off). */
void vn_dev_set_busy_poll(struct vn_dev *dev, uint32_t usecs);

/* VIRTIO_F_RING_RESET: reset one queue / enable it again with these rings
 * (context thread, after DRIVER_OK). */
int vn_dev_queue_reset(struct vn_dev *dev, unsigned qidx);
int vn_dev_queue_enable(struct vn_dev *dev, unsigned qidx, uint16_t size, uint64_t desc,
                        uint64_t avail, uint64_t used, uint16_t vector);

/* Counters snapshot (lock-free relaxed reads). */
void vn_dev_get_qp_stats(struct vn_dev *dev, unsigned qp, struct vn_qp_stats *out);
void vn_dev_get_ctrl_stats(struct vn_dev *dev, struct vn_dir_stats *out);
void vn_dev_get_dev_stats(struct vn_dev *dev, struct vn_dev_stats *out);
uint64_t vn_dev_get_irq_count(struct vn_dev *dev, uint16_t vector);

/* Device-side ring state of queue qidx (rx0, tx0, ..., control) for
 * operators: no guest memory is read (it may be unmapped meanwhile). */

struct vn_ring_state {
    bool configured;
    bool ready;
    bool broken;
    bool event_idx;
    uint16_t size;
    uint16_t msix_vector;
    uint16_t last_avail;
    uint16_t used_idx;
    uint16_t avail_seen;     /* the driver's avail index when last read */
    uint64_t desc_gpa, avail_gpa, used_gpa;
};
int vn_dev_get_ring_state(struct vn_dev *dev, unsigned qidx, struct vn_ring_state *out);

/* Transmit doorbells on the thread that received them while the pair's
 * worker sleeps (vn_qp_tx_inline, worker.h). Set before the workers start. */
void vn_dev_set_tx_inline(struct vn_dev *dev, bool on);

#endif
