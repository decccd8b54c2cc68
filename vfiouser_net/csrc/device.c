#include "device.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "ctrl.h"
#include "irq.h"
#include "layout.h"
#include "le.h"
#include "libvfio-user.h"
#include "log.h"
#include "net_hdr.h"
#include "tap.h"
#include "worker.h"

static const char *const drop_names[VN_DROP__COUNT] = {
    [VN_DROP_BAD_CHAIN] = "bad_chain",
    [VN_DROP_HEADER_TOO_SHORT] = "header_too_short",
    [VN_DROP_FRAME_TOO_BIG] = "frame_too_big",
    [VN_DROP_BUFFER_TOO_SMALL] = "buffer_too_small",
    [VN_DROP_MAC_FILTER] = "mac_filter",
    [VN_DROP_LINK_DOWN] = "link_down",
    [VN_DROP_TAP_ERROR] = "tap_error",
    [VN_DROP_QUEUE_BROKEN] = "queue_broken",
    [VN_DROP_RESET] = "reset",
    [VN_DROP_STEER_BACKLOG] = "steer_backlog",
    [VN_DROP_QUEUE_DISABLED] = "queue_disabled",
    [VN_DROP_PAIR_NOT_READY] = "pair_not_ready",
    [VN_DROP_VLAN_FILTER] = "vlan_filter",
};

static const char *const error_names[VN_ERR__COUNT] = {
    [VN_ERR_DESC_ADDR] = "desc_addr",
    [VN_ERR_DESC_NEXT] = "desc_next",
    [VN_ERR_DESC_LOOP] = "desc_loop",
    [VN_ERR_DESC_ORDER] = "desc_order",
    [VN_ERR_INDIRECT] = "indirect",
    [VN_ERR_CHAIN_TOO_LONG] = "chain_too_long",
    [VN_ERR_AVAIL_IDX] = "avail_idx",
    [VN_ERR_HEAD_INDEX] = "head_index",
    [VN_ERR_RING_ADDR] = "ring_addr",
    [VN_ERR_ZERO_LENGTH] = "zero_length",
};

const char *vn_drop_reason_name(int reason)
{
    return reason >= 0 && reason < VN_DROP__COUNT ? drop_names[reason] : "unknown";
}

const char *vn_error_reason_name(int reason)
{
    return reason >= 0 && reason < VN_ERR__COUNT ? error_names[reason] : "unknown";
}

uint32_t vn_batch_bucket_bound(unsigned i)
{
    return i < VN_BATCH_BUCKETS ? 1u << i : 0;
}

uint32_t vn_size_bucket_bound(unsigned i)
{
    static const uint32_t bounds[VN_SIZE_BUCKETS] = VN_SIZE_BOUNDS;
    return i < VN_SIZE_BUCKETS ? bounds[i] : 0;
}

static void log_line(struct vn_dev *dev, int level, const char *msg)
{
    if (dev->hooks.log != NULL)
        dev->hooks.log(dev->hooks.py, level, msg);
    else
        fprintf(stderr, "vfiouser-net: %s\n", msg);
}

/* Within this second's budget? A new second refills it and returns, in
 * *suppressed, how many were left out before. */
static bool log_budget(struct vn_dev *dev, int level, unsigned *suppressed)
{
    *suppressed = 0;
    if (level > LOG_WARNING)
        return true;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    uint64_t sec = (uint64_t)ts.tv_sec;
    uint64_t seen = atomic_load_explicit(&dev->log_second, memory_order_relaxed);
    if (seen != sec && atomic_compare_exchange_strong(&dev->log_second, &seen, sec)) {
        atomic_store(&dev->log_budget, VN_LOG_PER_SEC);
        *suppressed = atomic_exchange(&dev->log_suppressed, 0);
    }
    if (atomic_fetch_sub(&dev->log_budget, 1) > 0)
        return true;
    atomic_fetch_add(&dev->log_suppressed, 1);
    return false;
}

void vn_log(struct vn_dev *dev, int level, const char *fmt, ...)
{
    unsigned suppressed;
    if (!log_budget(dev, level, &suppressed))
        return;
    char buf[512];
    if (suppressed > 0) {
        snprintf(buf, sizeof(buf), "%u warnings and errors not logged (more than %d a second)",
                 suppressed, VN_LOG_PER_SEC);
        log_line(dev, LOG_WARNING, buf);
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    log_line(dev, level, buf);
}

struct vn_dev *vn_dev_new(unsigned max_qps, const uint8_t mac[6], uint32_t mtu)
{
    if (max_qps == 0 || max_qps > VN_MAX_QUEUE_PAIRS)
        return NULL;
    struct vn_dev *dev = calloc(1, sizeof(*dev));
    if (dev == NULL)
        return NULL;
    dev->max_qps = max_qps;
    dev->mtu = mtu;
    vn_mem_init(&dev->mem);
    vn_rx_filter_reset(&dev->filter, mac);
    memcpy(dev->default_mac, mac, 6);
    pthread_rwlock_init(&dev->irq_lock, NULL);
    pthread_mutex_init(&dev->tap_req_lock, NULL);
    pthread_cond_init(&dev->tap_req_cond, NULL);
    atomic_store(&dev->config_vector, VN_VQ_NO_VECTOR);
    /* Without a vfio-user context (unit tests) interrupts go out as asked;
     * server.c follows the driver's MSI-X enable bit. */
    atomic_store(&dev->msix_on, true);
    atomic_store(&dev->link_up, true);
    dev->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    dev->notify.fd = -1;
    dev->cmd_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (vn_capture_init(&dev->capture) < 0) {
        dev->capture.send_fd = dev->capture.recv_fd = -1;
        atomic_store(&dev->capture.queue, -2);
    }
    dev->hdr_len = VN_NET_HDR_LEN;
    dev->drain_grace_ns = VN_STEER_DRAIN_GRACE_NS;
    atomic_store(&dev->requested_policy, -1);
    vn_steering_set_policy(&dev->steer, VN_POLICY_AUTO);
    vn_steering_reset(&dev->steer);
    for (unsigned i = 0; i < max_qps; i++) {
        struct vn_qp *qp = &dev->qp[i];
        qp->dev = dev;
        qp->index = i;
        qp->tap_fd = -1;
        qp->kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        pthread_mutex_init(&qp->lock, NULL);
        pthread_cond_init(&qp->cond, NULL);
        pthread_mutex_init(&qp->inbox.lock, NULL);
        vn_vq_init(&qp->rx, &dev->mem, &qp->st.rx);
        vn_vq_init(&qp->tx, &dev->mem, &qp->st.tx);
        qp->spare = malloc(sizeof(struct vn_pkt) + VN_NET_HDR_MAX_LEN + VN_MAX_FRAME);
        if (qp->spare == NULL) {
            dev->max_qps = i + 1;
            vn_dev_free(dev);
            return NULL;
        }
    }
    vn_vq_init(&dev->ctrl, &dev->mem, &dev->ctrl_stats);
    return dev;
}

void vn_dev_free(struct vn_dev *dev)
{
    if (dev == NULL)
        return;
    vn_dev_reset(dev);
    for (unsigned i = 0; i < dev->max_qps; i++) {
        close(dev->qp[i].kick_fd);
        free(dev->qp[i].spare);
        if (dev->qp[i].txb != NULL)
            vn_tap_batch_free(dev->qp[i].txb);
        free(dev->qp[i].txb);
        pthread_mutex_destroy(&dev->qp[i].inbox.lock);
        pthread_mutex_destroy(&dev->qp[i].lock);
        pthread_cond_destroy(&dev->qp[i].cond);
    }
    close(dev->stop_fd);
    close(dev->cmd_fd);
    vn_notify_page_fini(&dev->notify);
    vn_capture_fini(&dev->capture);
    pthread_rwlock_destroy(&dev->irq_lock);
    pthread_mutex_destroy(&dev->tap_req_lock);
    pthread_cond_destroy(&dev->tap_req_cond);
    free(dev);
}

void vn_dev_set_hooks(struct vn_dev *dev, const struct vn_hooks *hooks)
{
    dev->hooks = *hooks;
}

/* The pair's TAP, also in its io_uring ring when it has one. Context
 * thread, with the pair's worker parked or not started. */
static void qp_set_tap(struct vn_qp *qp, int fd)
{
    qp->tap_fd = fd;
    if (qp->txb == NULL || !qp->txb->ready)
        return;
    int r = vn_tap_batch_set_fd(qp->txb, fd);
    if (r < 0) {
        /* Without its TAP the ring would write elsewhere or nowhere. */
        qp->txb->broken = true;
        vn_log(qp->dev, LOG_WARNING, "queue pair %u: io_uring TAP update failed (%s): writing "
               "frame by frame", qp->index, strerror(-r));
    }
}

void vn_dev_set_tap(struct vn_dev *dev, unsigned qp, int fd)
{
    if (qp < dev->max_qps)
        qp_set_tap(&dev->qp[qp], fd);
}

/* Back to one writev a frame for every pair (a ring that failed to set up). */
static void stop_tap_batching(struct vn_dev *dev)
{
    for (unsigned i = 0; i < dev->max_qps; i++) {
        struct vn_qp *qp = &dev->qp[i];
        if (qp->txb == NULL)
            continue;
        vn_tap_batch_free(qp->txb);
        free(qp->txb);
        qp->txb = NULL;
    }
}

int vn_dev_use_tap_batching(struct vn_dev *dev)
{
    for (unsigned i = 0; i < dev->max_qps; i++) {
        struct vn_qp *qp = &dev->qp[i];
        if (qp->txb != NULL)
            continue;
        struct vn_tap_batch *b = calloc(1, sizeof(*b));
        if (b == NULL)
            return -ENOMEM;
        int r = vn_tap_batch_init(b);
        if (r < 0) {
            free(b);
            stop_tap_batching(dev);
            return r;
        }
        qp->txb = b;
        qp_set_tap(qp, qp->tap_fd);
    }
    return 0;
}

bool vn_dev_tap_batching(struct vn_dev *dev)
{
    for (unsigned i = 0; i < dev->max_qps; i++)
        if (dev->qp[i].txb == NULL || !vn_tap_batch_usable(dev->qp[i].txb))
            return false;
    return true;
}

/* Has the context thread yet to apply or drop the posted request? */
static bool tap_request_pending(const struct vn_dev *dev)
{
    return dev->tap_done_seq != dev->tap_req_seq;
}

int vn_dev_replace_taps(struct vn_dev *dev, const int *fds, unsigned n, unsigned timeout_ms)
{
    if (n == 0 || n > dev->max_qps)
        return -EINVAL;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000u;
    until.tv_nsec += (long)(timeout_ms % 1000u) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&dev->tap_req_lock);
    /* One request at a time: a second caller's fds would overwrite the first
     * one's, and the first caller would take the second's completion for its
     * own and keep fds that were never installed. */
    int r = 0;
    while (tap_request_pending(dev) && r == 0)
        r = pthread_cond_timedwait(&dev->tap_req_cond, &dev->tap_req_lock, &until);
    if (tap_request_pending(dev)) {
        pthread_mutex_unlock(&dev->tap_req_lock);
        return -ETIMEDOUT;
    }
    memcpy(dev->tap_req_fds, fds, n * sizeof(*fds));
    dev->tap_req_n = n;
    uint64_t seq = ++dev->tap_req_seq;
    eventfd_write(dev->cmd_fd, 1);
    r = 0;
    while (dev->tap_done_seq < seq && r == 0)
        r = pthread_cond_timedwait(&dev->tap_req_cond, &dev->tap_req_lock, &until);
    int ret = 0;
    if (dev->tap_done_seq < seq) {
        /* Withdraw the request before returning: the caller closes these fds
         * on failure and their numbers get reused (another client's socket,
         * a capture file). The context thread applies a request only under
         * this lock, so from here on it can never install them. */
        dev->tap_done_seq = seq;
        dev->tap_req_n = 0;
        for (unsigned i = 0; i < VN_MAX_QUEUE_PAIRS; i++)
            dev->tap_req_fds[i] = -1;
        ret = -ETIMEDOUT;
    }
    /* Wakes a caller waiting for its turn. */
    pthread_cond_broadcast(&dev->tap_req_cond);
    pthread_mutex_unlock(&dev->tap_req_lock);
    return ret;
}

void vn_dev_apply_requested_taps(struct vn_dev *dev)
{
    pthread_mutex_lock(&dev->tap_req_lock);
    if (!tap_request_pending(dev)) {
        pthread_mutex_unlock(&dev->tap_req_lock);
        return;
    }
    bool was_paused = dev->workers_paused;
    vn_dev_pause_workers(dev);
    for (unsigned i = 0; i < dev->max_qps; i++) {
        struct vn_qp *qp = &dev->qp[i];
        qp_set_tap(qp, i < dev->tap_req_n ? dev->tap_req_fds[i] : -1);
        qp->tap_detached = false;
        atomic_store(&qp->tap_failed, false);
        if (qp->tap_fd < 0 || !dev->started)
            continue;
        /* A new TAP speaks the 12-byte header without offloads until told. */
        vn_tap_set_vnet_hdr_len(qp->tap_fd, (int)dev->hdr_len);
        vn_tap_set_guest_offloads(qp->tap_fd, dev->features);
        if (!qp->thread_started && vn_tap_set_queue_attached(qp->tap_fd, false) == 0)
            qp->tap_detached = true;
    }
    VN_STAT_INC(dev->st.tap_replacements);
    if (!was_paused)
        vn_dev_resume_workers(dev);
    dev->tap_done_seq = dev->tap_req_seq;
    /* Read under the lock: the next request may overwrite it once we let go. */
    unsigned n = dev->tap_req_n;
    pthread_cond_broadcast(&dev->tap_req_cond);
    pthread_mutex_unlock(&dev->tap_req_lock);
    vn_log(dev, LOG_INFO, "TAP queues replaced (%u)", n);
}

static struct vn_vq *queue_by_index(struct vn_dev *dev, unsigned qidx)
{
    if (qidx < 2 * dev->max_qps)
        return qidx % 2 == 0 ? &dev->qp[qidx / 2].rx : &dev->qp[qidx / 2].tx;
    if (qidx == 2 * dev->max_qps)
        return &dev->ctrl;
    return NULL;
}

int vn_dev_config_queue(struct vn_dev *dev, unsigned qidx, uint16_t size, uint64_t desc,
                        uint64_t avail, uint64_t used, uint16_t vector)
{
    struct vn_vq *vq = queue_by_index(dev, qidx);
    if (vq == NULL || dev->started)
        return -EINVAL;
    vq->size = size;
    vq->desc_gpa = desc;
    vq->avail_gpa = avail;
    vq->used_gpa = used;
    vq->msix_vector = vector;
    return 0;
}

/* VIRTIO_F_RING_RESET (2.6.1): the driver resets one queue after DRIVER_OK,
 * may give it new rings and a new size, and enables it again. Context thread;
 * every worker is parked meanwhile (the rings of one pair are read by other
 * pairs' workers too, when they steer frames to it). */
int vn_dev_queue_reset(struct vn_dev *dev, unsigned qidx)
{
    struct vn_vq *vq = queue_by_index(dev, qidx);
    if (vq == NULL || !dev->started)
        return -EINVAL;
    bool paused = dev->workers_paused;
    vn_dev_pause_workers(dev);
    if (vq != &dev->ctrl) {
        struct vn_qp *qp = &dev->qp[qidx / 2];
        if (qidx % 2 == 0) {
            atomic_store(&qp->rx_ready, false);
            atomic_store(&qp->rx_resetting, true);
            /* Buffers taken from the old ring are the driver's again. */
            qp->rx_first = qp->rx_count = qp->rx_iov_end = 0;
            qp->rx_prefetched_bytes = 0;
            vn_inbox_drain(dev, qp, VN_DROP_QUEUE_DISABLED);
            vn_coal_set(&qp->rx_coal, dev->coal_rx_all);
            qp->rx_coal.pending = 0;
        } else {
            vn_coal_set(&qp->tx_coal, dev->coal_tx_all);
            qp->tx_coal.pending = 0;
        }
    }
    vn_vq_reset_state(vq);
    vq->size = 0;
    vq->msix_vector = VN_VQ_NO_VECTOR;
    if (!paused)
        vn_dev_resume_workers(dev);
    return 0;
}

int vn_dev_queue_enable(struct vn_dev *dev, unsigned qidx, uint16_t size, uint64_t desc,
                        uint64_t avail, uint64_t used, uint16_t vector)
{
    struct vn_vq *vq = queue_by_index(dev, qidx);
    if (vq == NULL || !dev->started)
        return -EINVAL;
    bool paused = dev->workers_paused;
    vn_dev_pause_workers(dev);
    vn_vq_reset_state(vq);
    vq->size = size;
    vq->desc_gpa = desc;
    vq->avail_gpa = avail;
    vq->used_gpa = used;
    vq->msix_vector = vector;
    vq->event_idx = VN_HAS(dev->features, VN_F_RING_EVENT_IDX);
    vq->indirect = VN_HAS(dev->features, VN_F_RING_INDIRECT_DESC);
    int r = vn_vq_map(vq) ? 0 : -EINVAL;
    if (vq != &dev->ctrl) {
        struct vn_qp *qp = &dev->qp[qidx / 2];
        if (qidx % 2 == 0) {
            atomic_store(&qp->rx_ready, r == 0 && qp->thread_started);
            atomic_store(&qp->rx_resetting, false);
        }
    }
    if (!paused)
        vn_dev_resume_workers(dev);
    if (r < 0)
        vn_dev_fatal(dev, "a re-enabled queue's ring addresses are outside guest memory");
    return r;
}

static void start_worker(struct vn_qp *qp)
{
    atomic_store(&qp->req, VN_QP_RUN);
    qp->parked = false;
    if (pthread_create(&qp->thread, NULL, vn_qp_worker, qp) == 0)
        qp->thread_started = true;
    else
        vn_log(qp->dev, LOG_ERR, "queue pair %u: cannot start worker", qp->index);
}

/* rx-follows-tx learns flows from transmitted frames; with one pair in use
 * every frame goes to it anyway, so the per-frame parse is saved. */
static bool vn_dev_learns_tx(const struct vn_dev *dev)
{
    return dev->active_qps > 1 && vn_steering_effective(&dev->steer) == VN_POLICY_RX_FOLLOWS_TX;
}

int vn_dev_start(struct vn_dev *dev, uint64_t features)
{
    if (dev->started)
        return 0;
    dev->features = features;
    /* Before any worker starts: the table itself was emptied at reset. */
    dev->filter.vlan_filter = VN_HAS(features, VN_F_CTRL_VLAN);
    dev->hdr_len = VN_HAS(features, VN_F_HASH_REPORT) ? VN_NET_HDR_HASH_LEN : VN_NET_HDR_LEN;
    bool event_idx = VN_HAS(features, VN_F_RING_EVENT_IDX);
    bool indirect = VN_HAS(features, VN_F_RING_INDIRECT_DESC);
    int ret = 0;
    /* The driver has one pair until it asks for more (VQ_PAIRS_SET or
     * RSS_CONFIG); without MQ it only knows the first pair. */
    dev->active_qps = 1;
    unsigned pairs = vn_dev_driver_pairs(dev, features);
    for (unsigned i = 0; i < pairs; i++) {
        struct vn_qp *qp = &dev->qp[i];
        struct vn_vq *vqs[2] = { &qp->rx, &qp->tx };
        for (int k = 0; k < 2; k++) {
            vn_vq_reset_state(vqs[k]);
            vqs[k]->event_idx = event_idx;
            vqs[k]->indirect = indirect;
            if (vqs[k]->size != 0 && !vn_vq_map(vqs[k])) {
                vn_log(dev, LOG_ERR,
                       "queue %u: ring addresses outside guest memory (is guest RAM a shared "
                       "memory backend, e.g. memory-backend-memfd,share=on?)",
                       2 * i + k);
                ret = -1;
            }
        }
        if (qp->tap_fd >= 0) {
            vn_tap_set_vnet_hdr_len(qp->tap_fd, (int)dev->hdr_len);
            int r = vn_tap_set_guest_offloads(qp->tap_fd, features);
            if (r < 0)
                vn_log(dev, LOG_WARNING,
                       "queue pair %u: the TAP refused the guest's offloads (%s): the host "
                       "kernel segments and checksums for it",
                       i, strerror(-r));
        }
    }
    vn_vq_reset_state(&dev->ctrl);
    dev->ctrl.event_idx = event_idx;
    dev->ctrl.indirect = indirect;
    if (VN_HAS(features, VN_F_CTRL_VQ) && dev->ctrl.size != 0 && !vn_vq_map(&dev->ctrl)) {
        vn_log(dev, LOG_ERR, "control queue: ring addresses outside guest memory");
        ret = -1;
    }
    if (ret != 0)
        return ret;
    dev->learn_tx = vn_dev_learns_tx(dev);
    /* Set before any worker runs: pair 0's own worker may bounce a frame
     * to itself at once. */
    for (unsigned i = 0; i < pairs; i++)
        atomic_store(&dev->qp[i].rx_ready, vn_vq_ready(&dev->qp[i].rx));
    for (unsigned i = 0; i < pairs; i++) {
        if (dev->qp[i].rx.size != 0 || dev->qp[i].tx.size != 0)
            start_worker(&dev->qp[i]);
        if (!dev->qp[i].thread_started)
            atomic_store(&dev->qp[i].rx_ready, false);
    }
    /* A TAP queue without a worker (a driver without MQ, a pair it left
     * unconfigured) would still get its share of the host's frames, and
     * nobody would read them. */
    for (unsigned i = 0; i < dev->max_qps; i++) {
        struct vn_qp *qp = &dev->qp[i];
        if (qp->tap_fd < 0 || qp->thread_started)
            continue;
        int r = vn_tap_set_queue_attached(qp->tap_fd, false);
        if (r < 0)
            vn_log(dev, LOG_WARNING, "queue pair %u: detaching its TAP queue failed: %s", i,
                   strerror(-r));
        else
            qp->tap_detached = true;
    }
    dev->started = true;
    return 0;
}

static void stop_worker(struct vn_qp *qp)
{
    if (!qp->thread_started)
        return;
    pthread_mutex_lock(&qp->lock);
    atomic_store(&qp->req, VN_QP_STOP);
    pthread_cond_broadcast(&qp->cond);
    pthread_mutex_unlock(&qp->lock);
    eventfd_write(qp->kick_fd, 1);
    pthread_join(qp->thread, NULL);
    qp->thread_started = false;
}

void vn_dev_reset(struct vn_dev *dev)
{
    for (unsigned i = 0; i < dev->max_qps; i++) {
        struct vn_qp *qp = &dev->qp[i];
        stop_worker(qp);
        atomic_store(&qp->rx_ready, false);
        atomic_store(&qp->rx_resetting, false);
        eventfd_t v;
        eventfd_read(qp->kick_fd, &v);
        vn_vq_reset_state(&qp->rx);
        vn_vq_reset_state(&qp->tx);
        qp->rx.size = qp->tx.size = 0;
        qp->rx.msix_vector = qp->tx.msix_vector = VN_VQ_NO_VECTOR;
        qp->rx_first = qp->rx_count = qp->rx_iov_end = 0;
        qp->rx_prefetched_bytes = 0;
        /* Coalescing parameters start at 0 after a reset (5.1.6.5.9). */
        struct vn_coal_params none = { 0, 0 };
        vn_coal_set(&qp->rx_coal, none);
        vn_coal_set(&qp->tx_coal, none);
        qp->rx_coal.pending = qp->tx_coal.pending = 0;
        vn_inbox_drain(dev, qp, VN_DROP_RESET);
        if (qp->tap_fd >= 0) {
            vn_tap_set_guest_offloads(qp->tap_fd, 0);
            vn_tap_set_vnet_hdr_len(qp->tap_fd, VN_NET_HDR_LEN);
            if (qp->tap_detached) {
                int r = vn_tap_set_queue_attached(qp->tap_fd, true);
                if (r < 0)
                    vn_log(dev, LOG_WARNING, "queue pair %u: re-attaching its TAP queue failed: %s",
                           i, strerror(-r));
                qp->tap_detached = false;
            }
        }
    }
    vn_vq_reset_state(&dev->ctrl);
    dev->ctrl.size = 0;
    dev->ctrl.msix_vector = VN_VQ_NO_VECTOR;
    dev->started = false;
    dev->workers_paused = false;
    dev->features = 0;
    dev->active_qps = 0;
    dev->hdr_len = VN_NET_HDR_LEN;
    dev->flush_tx_on_pause = false;
    dev->coal_rx_all = dev->coal_tx_all = (struct vn_coal_params){ 0, 0 };
    vn_notify_page_clear(&dev->notify);
    atomic_store(&dev->ctrl_kicked, false);
    atomic_store(&dev->ctrl_resume, false);
    atomic_store(&dev->old_inflight, 0);
    atomic_store(&dev->drain_pending, false);
    vn_steering_reset(&dev->steer);
    dev->learn_tx = false;
    atomic_store(&dev->needs_reset, false);
    atomic_store(&dev->announce, false);
    atomic_store(&dev->config_vector, VN_VQ_NO_VECTOR);
    atomic_store(&dev->isr, 0);
    /* A MAC the driver set (CTRL_MAC_ADDR) does not survive a reset. */
    vn_rx_filter_reset(&dev->filter, dev->default_mac);
}

void vn_dev_pause_workers(struct vn_dev *dev)
{
    if (dev->workers_paused)
        return;
    dev->workers_paused = true;
    for (unsigned i = 0; i < dev->max_qps; i++) {
        struct vn_qp *qp = &dev->qp[i];
        if (!qp->thread_started)
            continue;
        atomic_store(&qp->req, VN_QP_PAUSE);
        eventfd_write(qp->kick_fd, 1);
    }
    for (unsigned i = 0; i < dev->max_qps; i++) {
        struct vn_qp *qp = &dev->qp[i];
        if (!qp->thread_started)
            continue;
        pthread_mutex_lock(&qp->lock);
        while (!qp->parked)
            pthread_cond_wait(&qp->cond, &qp->lock);
        pthread_mutex_unlock(&qp->lock);
    }
}

void vn_dev_resume_workers(struct vn_dev *dev)
{
    if (!dev->workers_paused)
        return;
    dev->workers_paused = false;
    for (unsigned i = 0; i < dev->max_qps; i++) {
        struct vn_qp *qp = &dev->qp[i];
        if (!qp->thread_started)
            continue;
        pthread_mutex_lock(&qp->lock);
        atomic_store(&qp->req, VN_QP_RUN);
        pthread_cond_broadcast(&qp->cond);
        pthread_mutex_unlock(&qp->lock);
    }
    /* The control queue runs on this thread: re-translate its rings now. */
    if (dev->started && dev->ctrl.size != 0 && !dev->ctrl.broken && !vn_vq_map(&dev->ctrl))
        vn_dev_fatal(dev, "control queue ring no longer in guest memory");
}

void vn_dev_steering_begin(struct vn_dev *dev)
{
    dev->flush_tx_on_pause = true;
    vn_dev_pause_workers(dev);
    dev->flush_tx_on_pause = false;
}

void vn_dev_steering_commit(struct vn_dev *dev, unsigned active_qps)
{
    /* Workers are parked: the inboxes are ours. Frames for pairs the driver
     * no longer uses must not be placed there (spec); the rest keep their old
     * epoch and hold back every TAP read until they are placed. Frames no
     * worker will place (a ring that broke since they were queued) would
     * hold them back for good: dropped. */
    int old = 0;
    for (unsigned i = 0; i < dev->max_qps; i++) {
        struct vn_qp *qp = &dev->qp[i];
        if (i >= active_qps)
            vn_inbox_drain(dev, qp, VN_DROP_QUEUE_DISABLED);
        else if (!vn_qp_takes_frames(qp))
            vn_inbox_drain(dev, qp, atomic_load(&qp->rx_ready) ? VN_DROP_QUEUE_BROKEN
                                                               : VN_DROP_PAIR_NOT_READY);
        old += (int)qp->inbox.count;
    }
    /* Wait for every ring that may hold old frames: pairs just disabled
     * too, or a flow moved off them could overtake its own frames. */
    dev->drain_qps = dev->active_qps > active_qps ? dev->active_qps : active_qps;
    dev->active_qps = active_qps;
    dev->learn_tx = vn_dev_learns_tx(dev);
    atomic_store(&dev->old_inflight, old);
    if (dev->started) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t now = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
        dev->drain_deadline_ns = now + VN_STEER_DRAIN_MAX_NS;
        dev->old_deadline_ns = now + VN_STEER_OLD_MAX_NS;
        atomic_store(&dev->drained_since_ns, 0);
        atomic_store(&dev->drain_pending, true);
    }
    atomic_fetch_add(&dev->epoch, 1);
    VN_STAT_INC(dev->st.steering_switches);
    vn_dev_resume_workers(dev);
}

bool vn_dev_steering_hold(struct vn_dev *dev)
{
    if (atomic_load(&dev->old_inflight) > 0)
        return true;
    if (!atomic_load(&dev->drain_pending))
        return false;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    /* Only rings the device places frames in: a ring the driver did not set
     * up, or that broke, will never show the driver caught up. */
    bool caught_up = true;
    for (unsigned i = 0; i < dev->drain_qps && i < dev->max_qps && caught_up; i++)
        caught_up = !vn_qp_takes_frames(&dev->qp[i]) || vn_vq_driver_caught_up(&dev->qp[i].rx);
    if (now < dev->drain_deadline_ns) {
        if (!caught_up) {
            atomic_store(&dev->drained_since_ns, 0);
            return true;
        }
        uint64_t since = 0;
        if (atomic_compare_exchange_strong(&dev->drained_since_ns, &since, now))
            since = now;
        if (now < since + dev->drain_grace_ns)
            return true;
    }
    if (atomic_exchange(&dev->drain_pending, false) && !caught_up)
        __atomic_fetch_add(&dev->st.steering_drain_timeouts, 1, __ATOMIC_RELAXED);
    return false;
}

void vn_dev_request_policy(struct vn_dev *dev, int policy)
{
    if (policy < 0 || policy >= VN_POLICY__COUNT)
        return;
    atomic_store(&dev->requested_policy, policy);
    eventfd_write(dev->cmd_fd, 1);
}

void vn_dev_apply_requested_policy(struct vn_dev *dev)
{
    int policy = atomic_exchange(&dev->requested_policy, -1);
    if (policy < 0 || policy == dev->steer.policy)
        return;
    int before = vn_steering_effective(&dev->steer);
    vn_dev_steering_begin(dev);
    vn_steering_set_policy(&dev->steer, policy);
    vn_dev_steering_commit(dev, dev->started ? dev->active_qps : 0);
    vn_log(dev, LOG_INFO, "steering policy %s (effective %s, was %s)", vn_policy_name(policy),
           vn_policy_name(vn_steering_effective(&dev->steer)), vn_policy_name(before));
}

/* BAR0 at VN_STEER_STATE_OFF (layout.h): le32 magic "VNST", version,
 * configured policy, effective policy, reserved, le16 active pairs, le16
 * max pairs, le32 switches. Built on each read, so reads have no side
 * effects and never show a half-updated rule (context thread). */
void vn_dev_steer_state(struct vn_dev *dev, uint8_t out[VN_STEER_STATE_LEN])
{
    memset(out, 0, VN_STEER_STATE_LEN);
    vn_le32_put(out, VN_STEER_STATE_MAGIC);
    out[4] = 1;
    out[5] = (uint8_t)dev->steer.policy;
    out[6] = (uint8_t)vn_steering_effective(&dev->steer);
    vn_le16_put(out + 8, (uint16_t)dev->active_qps);
    vn_le16_put(out + 10, (uint16_t)dev->max_qps);
    vn_le32_put(out + 12, (uint32_t)VN_STAT_LOAD(dev->st.steering_switches));
}

void vn_dev_get_steering(struct vn_dev *dev, struct vn_steer_info *out)
{
    memset(out, 0, sizeof(*out));
    out->policy = dev->steer.policy;
    out->effective = vn_steering_effective(&dev->steer);
    out->active_qps = dev->active_qps;
    out->max_qps = dev->max_qps;
    out->epoch = atomic_load(&dev->epoch);
    const struct vn_rss_config *r = &dev->steer.rss;
    out->rss_configured = r->configured;
    out->hash_types = r->hash_types;
    out->table_len = r->table_len;
    out->unclassified = r->unclassified;
    memcpy(out->table, r->table, sizeof(out->table));
    out->key_len = r->key_len;
    memcpy(out->key, r->key, sizeof(out->key));
}

void vn_dev_set_link(struct vn_dev *dev, bool up)
{
    atomic_store(&dev->link_up, up);
}

void vn_dev_set_announce(struct vn_dev *dev, bool on)
{
    atomic_store(&dev->announce, on);
}

bool vn_dev_get_announce(struct vn_dev *dev)
{
    return atomic_load(&dev->announce);
}

bool vn_dev_get_needs_reset(struct vn_dev *dev)
{
    return atomic_load(&dev->needs_reset);
}

void vn_dev_set_config_vector(struct vn_dev *dev, uint16_t vector)
{
    atomic_store(&dev->config_vector, vector);
}

void vn_dev_get_mac(struct vn_dev *dev, uint8_t mac_out[6])
{
    memcpy(mac_out, dev->filter.mac, 6);
}

void vn_dev_get_filter(struct vn_dev *dev, struct vn_rx_filter *out)
{
    *out = dev->filter;
}

void vn_dev_fatal(struct vn_dev *dev, const char *why)
{
    bool was = atomic_exchange(&dev->needs_reset, true);
    if (was)
        return;
    VN_STAT_INC(dev->st.needs_reset);
    vn_log(dev, LOG_ERR, "device needs reset: %s", why);
    vn_irq_raise(dev, atomic_load(&dev->config_vector));
}

int vn_dev_enable_notify_polling(struct vn_dev *dev)
{
    if (dev->notify.map != NULL)
        return 0;
    return vn_notify_page_init(&dev->notify, VN_BAR0_SIZE, VN_NOTIFY_OFF, VN_NOTIFY_LEN);
}

void vn_dev_set_tx_inline(struct vn_dev *dev, bool on)
{
    dev->tx_inline = on;
}

void vn_dev_set_busy_poll(struct vn_dev *dev, uint32_t usecs)
{
    dev->busy_poll_ns = (uint64_t)usecs * 1000u;
}

void vn_dev_ctrl_poll_kick(struct vn_dev *dev)
{
    bool resume = atomic_exchange(&dev->ctrl_resume, false);
    if (atomic_exchange(&dev->ctrl_kicked, false))
        vn_dev_doorbell(dev, 2 * vn_dev_driver_pairs(dev, dev->features));
    else if (resume && dev->started && VN_HAS(dev->features, VN_F_CTRL_VQ) &&
             vn_vq_ready(&dev->ctrl))
        vn_ctrl_process(dev);
}

void vn_dev_set_coal(struct vn_dev *dev, unsigned qidx, struct vn_coal_params p)
{
    if (qidx >= 2 * dev->max_qps)
        return;
    struct vn_qp *qp = &dev->qp[qidx / 2];
    vn_coal_set(qidx % 2 == 0 ? &qp->rx_coal : &qp->tx_coal, p);
    /* An interrupt held back under the old parameters may be due now. */
    if (qp->thread_started)
        eventfd_write(qp->kick_fd, 1);
}

struct vn_coal_params vn_dev_get_coal(struct vn_dev *dev, unsigned qidx)
{
    struct vn_coal_params none = { 0, 0 };
    if (qidx >= 2 * dev->max_qps)
        return none;
    struct vn_qp *qp = &dev->qp[qidx / 2];
    return vn_coal_get(qidx % 2 == 0 ? &qp->rx_coal : &qp->tx_coal);
}

void vn_dev_doorbell(struct vn_dev *dev, unsigned qidx)
{
    if (!dev->started) {
        /* Harmless, but the driver may not notify before DRIVER_OK (3.1.1):
         * counted; DRIVER_OK starts the queues. */
        VN_STAT_INC(dev->st.doorbells_invalid);
        return;
    }
    /* The driver numbers the control queue after the pairs it can use. */
    unsigned ctrl_idx = 2 * vn_dev_driver_pairs(dev, dev->features);
    if (qidx == ctrl_idx && VN_HAS(dev->features, VN_F_CTRL_VQ)) {
        VN_STAT_INC(dev->ctrl_stats.doorbells);
        vn_ctrl_process(dev);
        return;
    }
    unsigned pairs = vn_dev_driver_pairs(dev, dev->features);
    if (qidx >= 2 * pairs || !dev->qp[qidx / 2].thread_started) {
        VN_STAT_INC(dev->st.doorbells_invalid);
        return;
    }
    struct vn_qp *qp = &dev->qp[qidx / 2];
    if (qidx % 2 == 0) {
        VN_STAT_INC(qp->st.rx.doorbells);
    } else {
        VN_STAT_INC(qp->st.tx.doorbells);
        if (dev->tx_inline && vn_qp_tx_inline(qp)) {
            VN_STAT_INC(dev->st.doorbells_inline);
            return;
        }
    }
    eventfd_write(qp->kick_fd, 1);
}

static void trigger(struct vn_dev *dev, uint16_t vector)
{
    /* Never an MSI-X message while the driver has MSI-X disabled (its
     * eventfds may be gone, or, in libvfio-user before our patch 0013,
     * another interrupt's). Config changes are in the ISR already. */
    if (!atomic_load(&dev->msix_on)) {
        VN_STAT_INC(dev->st.irqs_msix_off);
        return;
    }
    if (vfu_irq_trigger(dev->vfu, vector) < 0)
        VN_STAT_INC(dev->st.irq_errors);
    else
        __atomic_fetch_add(&dev->irq_sent[vector], 1, __ATOMIC_RELAXED);
}

/* Called with irq_lock held for reading. */
static void flush_locked(struct vn_dev *dev)
{
    for (unsigned w = 0; w < sizeof(dev->irq_pending) / sizeof(dev->irq_pending[0]); w++) {
        uint64_t bits = atomic_exchange(&dev->irq_pending[w], 0);
        while (bits != 0) {
            unsigned b = (unsigned)__builtin_ctzll(bits);
            bits &= bits - 1;
            trigger(dev, (uint16_t)(w * 64 + b));
        }
    }
}

void vn_irq_raise(struct vn_dev *dev, uint16_t vector)
{
    if (vector >= VN_MAX_VECTORS || dev->vfu == NULL)
        return;
    /* Publish the request first: if the context thread holds the lock for a
     * message (maybe SET_IRQS replacing this eventfd), it flushes the pending
     * bits after releasing it, so no interrupt is lost or sent to a stale fd. */
    atomic_fetch_or(&dev->irq_pending[vector / 64], 1ull << (vector % 64));
    if (pthread_rwlock_tryrdlock(&dev->irq_lock) == 0) {
        flush_locked(dev);
        pthread_rwlock_unlock(&dev->irq_lock);
    }
}

bool vn_irq_notify_queue(struct vn_dev *dev, uint16_t vector)
{
    if (!atomic_load(&dev->msix_on)) {
        atomic_fetch_or(&dev->isr, VN_ISR_QUEUE);
        VN_STAT_INC(dev->st.irqs_msix_off);
        return false;
    }
    if (vector == VN_VQ_NO_VECTOR)
        return false;
    vn_irq_raise(dev, vector);
    return true;
}

uint8_t vn_dev_take_isr(struct vn_dev *dev)
{
    return atomic_exchange(&dev->isr, 0);
}

void vn_dev_raise_isr(struct vn_dev *dev, uint8_t bits)
{
    atomic_fetch_or(&dev->isr, bits);
}

void vn_irq_flush_pending(struct vn_dev *dev)
{
    pthread_rwlock_rdlock(&dev->irq_lock);
    flush_locked(dev);
    pthread_rwlock_unlock(&dev->irq_lock);
}

static void copy_dir(struct vn_dir_stats *out, const struct vn_dir_stats *in)
{
    const uint64_t *src = (const uint64_t *)in;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*in) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

void vn_dev_get_qp_stats(struct vn_dev *dev, unsigned qp, struct vn_qp_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (qp >= dev->max_qps)
        return;
    copy_dir(&out->rx, &dev->qp[qp].st.rx);
    copy_dir(&out->tx, &dev->qp[qp].st.tx);
}

void vn_dev_get_ctrl_stats(struct vn_dev *dev, struct vn_dir_stats *out)
{
    copy_dir(out, &dev->ctrl_stats);
}

void vn_dev_get_dev_stats(struct vn_dev *dev, struct vn_dev_stats *out)
{
    const uint64_t *src = (const uint64_t *)&dev->st;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

uint64_t vn_dev_get_irq_count(struct vn_dev *dev, uint16_t vector)
{
    if (vector >= VN_MAX_VECTORS)
        return 0;
    return __atomic_load_n(&dev->irq_sent[vector], __ATOMIC_RELAXED);
}

int vn_dev_get_ring_state(struct vn_dev *dev, unsigned qidx, struct vn_ring_state *out)
{
    memset(out, 0, sizeof(*out));
    const struct vn_vq *vq = queue_by_index(dev, qidx);
    if (vq == NULL)
        return -EINVAL;
    /* Plain reads of fields other threads write: a snapshot for humans,
     * each field read once, possibly mid-update. */
    out->configured = __atomic_load_n(&vq->size, __ATOMIC_RELAXED) != 0;
    out->ready = __atomic_load_n(&vq->desc, __ATOMIC_RELAXED) != NULL;
    out->broken = __atomic_load_n(&vq->broken, __ATOMIC_RELAXED);
    out->event_idx = vq->event_idx;
    out->size = vq->size;
    out->msix_vector = vq->msix_vector;
    out->last_avail = __atomic_load_n(&vq->last_avail, __ATOMIC_RELAXED);
    out->used_idx = __atomic_load_n(&vq->used_idx, __ATOMIC_RELAXED);
    out->avail_seen = (uint16_t)VN_STAT_LOAD(vq->st->avail_seen);
    out->desc_gpa = vq->desc_gpa;
    out->avail_gpa = vq->avail_gpa;
    out->used_gpa = vq->used_gpa;
    return 0;
}
