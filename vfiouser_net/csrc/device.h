/* The virtio-net device as the datapath sees it: queue pairs with their
 * workers, the control queue, guest memory, the rx filter and interrupts.
 *
 * Threads (see also server.c):
 *  - the context thread runs vfu_run_ctx() and every libvfio-user callback,
 *    the Python control plane (called from those callbacks) and the control
 *    queue. It alone changes guest memory mappings, queue configuration and
 *    the rx filter, and only while the workers are paused or stopped;
 *  - one worker thread per started queue pair moves packets between its rx/tx
 *    rings and its TAP queue;
 *  - any thread may raise an interrupt through vn_irq_raise(), which never
 *    races SET_IRQS (the context thread holds irq_lock for writing while it
 *    processes a message). */
#ifndef VN_DEVICE_H
#define VN_DEVICE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "capture.h"
#include "coalesce.h"
#include "device_api.h"
#include "guest_mem.h"
#include "layout.h"
#include "notify_page.h"
#include "rx_filter.h"
#include "stats.h"
#include "steering.h"
#include "tap_batch.h"
#include "virtq.h"

#define VN_MAX_QUEUES (2 * VN_MAX_QUEUE_PAIRS + 1)
#define VN_MAX_VECTORS (VN_MAX_QUEUES + 1)
#define VN_TX_IOV_MAX 256
#define VN_RX_IOV_MAX 256
#define VN_RX_BUF_MAX 128

enum vn_qp_req { VN_QP_RUN = 0, VN_QP_PAUSE = 1, VN_QP_STOP = 2 };

struct vn_dev;

/* A frame on its way to another queue pair's receive ring (steering), or
 * waiting in the bounce path for room in its own. */
struct vn_pkt {
    struct vn_pkt *next;
    uint32_t len;            /* header + frame */
    uint32_t epoch;          /* steering epoch it was steered in */
    uint32_t hash;
    uint8_t report;
    uint8_t data[];
};

/* Frames steered to one queue pair, in arrival order (several producers). */
struct vn_inbox {
    pthread_mutex_t lock;
    struct vn_pkt *head, *tail;
    unsigned count;
    size_t bytes;            /* memory the frames hold, struct vn_pkt included */
};

/* What one inbox may hold (beyond, frames are dropped as steer_backlog): by
 * frames, and by bytes, since a frame may be 64 KiB (TSO) and 512 of them
 * per pair would be 32 MiB, 512 MiB for 16 pairs, held for a guest that need
 * not drain them. 4 MiB still takes 64 full-size frames or every 1500-byte
 * frame up to VN_INBOX_MAX. */
#define VN_INBOX_MAX 512
#define VN_INBOX_MAX_BYTES (4u << 20)

/* An rx buffer (one descriptor chain) popped ahead of the packet it will hold. */
struct vn_rx_buf {
    uint16_t head;
    uint16_t iov_start;
    uint16_t niov;
    bool bad;        /* malformed chain: returned with length 0 in turn */
    uint32_t len;
};

struct vn_qp {
    struct vn_dev *dev;
    unsigned index;
    struct vn_vq rx, tx;
    /* Frames may be queued for this pair (steered, or bounced by its own
     * worker): it has a worker and its receive ring was usable at DRIVER_OK.
     * Else no one would ever place them. Written by the context thread only
     * while no worker runs (vn_dev_start, vn_dev_reset); see
     * vn_qp_takes_frames. */
    _Atomic bool rx_ready;
    /* Its receive queue is reset by the driver (VIRTIO_F_RING_RESET) and not
     * enabled again yet: frames for it go to another pair (steer_to). */
    _Atomic bool rx_resetting;
    /* The worker sleeps (in ppoll) and the context thread may transmit for
     * it, holding tx_busy (vn_qp_tx_inline, worker.c). */
    _Atomic bool sleeping;
    _Atomic bool tx_busy;
    /* The sleeping worker polls its TAP: it would read it if woken (not
     * starved, no switch holding reads). The inline pass reads it then too. */
    _Atomic bool sleep_reads_tap;
    int tap_fd;
    bool tap_detached; /* TUNSETQUEUE'd off while it has no worker */
    /* The TAP queue answered EBADFD: the interface was deleted. The worker
     * stops reading it until the control plane hands a new one. */
    _Atomic bool tap_failed;
    int kick_fd;     /* eventfd: doorbells and pause/stop requests */
    pthread_t thread;
    bool thread_started;
    _Atomic int req;
    bool parked;     /* under lock */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct vn_qp_stats st;
    struct vn_coal rx_coal, tx_coal;

    /* Batched TAP writes (tap_batch.h), NULL when the device writes one
     * frame per writev. Used by the worker; the TAP in it is replaced by the
     * context thread while the worker is parked. */
    struct vn_tap_batch *txb;

    /* Worker-private. */
    uint64_t last_sleep_ns;   /* how long the last wait for work lasted */
    struct iovec tx_iov[VN_TX_IOV_MAX];
    struct iovec rx_iov[VN_RX_IOV_MAX];
    struct vn_rx_buf rx_buf[VN_RX_BUF_MAX];
    unsigned rx_first, rx_count;   /* prefetched rx buffers */
    unsigned rx_iov_end;
    uint64_t rx_prefetched_bytes;
    struct vn_inbox inbox;
    struct vn_pkt *spare;     /* buffer for the next frame read off the TAP */
    uint64_t log_budget_refill_ns;
    unsigned log_budget;
};

struct vn_dev {
    void *vfu;                   /* vfu_ctx_t */
    struct vn_hooks hooks;
    struct vn_mem mem;

    unsigned max_qps;
    unsigned active_qps;
    struct vn_qp qp[VN_MAX_QUEUE_PAIRS];
    struct vn_vq ctrl;
    struct vn_dir_stats ctrl_stats;
    bool started;

    uint64_t features;           /* negotiated */
    uint32_t hdr_len;            /* virtio-net header: 12, or 20 with HASH_REPORT */
    uint32_t mtu;
    struct vn_steering steer;
    bool learn_tx;               /* effective policy needs the tx flow table */
    bool flush_tx_on_pause;
    /* Frames steered before the last switch and not yet placed: while any
     * remain, no worker reads the TAP, so no flow overtakes itself. */
    _Atomic uint32_t epoch;
    _Atomic int old_inflight;
    /* After a switch, also until the guest has consumed what we placed in
     * its receive rings (EVENT_IDX used_event), bounded by a deadline: then
     * the old frames have reached the guest's sockets before any new one. */
    _Atomic bool drain_pending;
    uint64_t drain_deadline_ns;
    uint64_t old_deadline_ns;          /* VN_STEER_OLD_MAX_NS after the switch */
    _Atomic uint64_t drained_since_ns; /* first seen caught up (0: not yet) */
    uint64_t drain_grace_ns;           /* VN_STEER_DRAIN_GRACE_NS */
    unsigned drain_qps;                /* rx rings to wait for: the old and new pairs */
    _Atomic int requested_policy; /* from the operator, applied by the context thread */
    int cmd_fd;                   /* wakes the context thread for it */
    /* New TAP queue fds from the operator's thread, swapped in by the context
     * thread (vn_dev_replace_taps). */
    pthread_mutex_t tap_req_lock;
    pthread_cond_t tap_req_cond;
    int tap_req_fds[VN_MAX_QUEUE_PAIRS];
    unsigned tap_req_n;
    uint64_t tap_req_seq, tap_done_seq;
    /* MSI-X as the driver set it in the capability's message control, copied
     * by the context thread under irq_lock held for writing (server.c); read
     * by any thread. Off: no MSI-X message, the ISR status instead. */
    _Atomic bool msix_on;
    /* ISR status bits the datapath set (VN_ISR_QUEUE), taken by a read of
     * the ISR register. */
    _Atomic uint8_t isr;
    size_t msix_cap_pos, pci_cfg_cap_pos; /* in config space (server.c) */
    struct vn_rx_filter filter;
    /* What NOTF_COAL RX_SET/TX_SET last set for every queue (context thread). */
    struct vn_coal_params coal_rx_all, coal_tx_all;
    uint8_t default_mac[6];      /* what a reset returns to */
    _Atomic bool link_up;
    _Atomic bool announce;
    _Atomic bool needs_reset;
    _Atomic uint16_t config_vector;
    bool workers_paused;

    pthread_rwlock_t irq_lock;
    _Atomic uint64_t irq_pending[(VN_MAX_VECTORS + 63) / 64];
    uint64_t irq_sent[VN_MAX_VECTORS];

    int stop_fd;
    /* Doorbell polling mode when notify.map is set (notify_page.h). */
    struct vn_notify_page notify;
    _Atomic bool ctrl_kicked;    /* seen by pair 0's worker, for the context thread */
    /* The control queue stopped at its budget with commands left: the
     * context thread goes on with them from its loop (cmd_fd). */
    _Atomic bool ctrl_resume;
    /* Bounded busy-poll before a worker sleeps (0: off). */
    uint64_t busy_poll_ns;
    /* Transmit doorbells handled on the context thread while the pair's
     * worker sleeps (vn_qp_tx_inline). Set before the workers start. */
    bool tx_inline;
    struct vn_capture capture;
    struct vn_dev_stats st;
    /* Context thread: DMA regions server.c refused itself (the rest are
     * libvfio-user's count), and guest_mem_faults already acted on. */
    uint64_t dma_refused_own;
    uint64_t mem_faults_seen;
    /* Warnings and errors logged in the current second (vn_log): a client or
     * a guest can cause one per message or per interrupt. */
    _Atomic uint64_t log_second;
    _Atomic int log_budget;
    _Atomic unsigned log_suppressed;
};

/* May frames be queued for pair qp (any thread)? Not for a pair without
 * worker or receive ring, nor one whose ring broke. */
static inline bool vn_qp_takes_frames(const struct vn_qp *qp)
{
    return atomic_load_explicit(&qp->rx_ready, memory_order_relaxed) &&
           !__atomic_load_n(&qp->rx.broken, __ATOMIC_RELAXED);
}

/* Queue pairs the driver can see: all of them with MQ or RSS (virtio 1.x
 * 5.1.2: the control queue is then 2 * max_virtqueue_pairs), else one. */
static inline unsigned vn_dev_driver_pairs(const struct vn_dev *dev, uint64_t features)
{
    return (((features >> 22) & 1u) || ((features >> 60) & 1u)) ? dev->max_qps : 1;
}

/* Context thread: apply a pending vn_dev_replace_taps. */
void vn_dev_apply_requested_taps(struct vn_dev *dev);

void vn_dev_pause_workers(struct vn_dev *dev);
void vn_dev_resume_workers(struct vn_dev *dev);

/* Steering (context thread). A change pauses the workers (transmit queues
 * drained first), applies, and resumes; frames already steered under the old
 * rule are placed before any frame under the new one. */
void vn_dev_steering_begin(struct vn_dev *dev);
void vn_dev_steering_commit(struct vn_dev *dev, unsigned active_qps);
void vn_dev_apply_requested_policy(struct vn_dev *dev);
void vn_dev_steer_state(struct vn_dev *dev, uint8_t out[VN_STEER_STATE_LEN]);

/* True while TAP reads must wait after a switch (any thread). */
bool vn_dev_steering_hold(struct vn_dev *dev);

/* Interrupt coalescing of queue qidx (rx0, tx0, ...; context thread).
 * Setting wakes the worker so that the new conditions are checked at once. */
void vn_dev_set_coal(struct vn_dev *dev, unsigned qidx, struct vn_coal_params p);

/* The context thread's command eventfd fired: pair 0's worker saw the
 * control queue kicked in polling mode, or the control queue stopped at its
 * budget with commands left (ctrl_resume): serve it. */
void vn_dev_ctrl_poll_kick(struct vn_dev *dev);

/* Doorbell for queue qidx (context thread). */
void vn_dev_doorbell(struct vn_dev *dev, unsigned qidx);

#endif
