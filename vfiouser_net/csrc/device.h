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
#include "guest_mem.h"
#include "layout.h"
#include "notify_page.h"
#include "rx_filter.h"
#include "stats.h"
#include "steering.h"
#include "tap_batch.h"
#include "virtq.h"

#define VN_MAX_QUEUE_PAIRS 16
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
/* Context thread: apply a pending vn_dev_replace_taps. */
void vn_dev_apply_requested_taps(struct vn_dev *dev);

/* Queue configuration from common config; qidx: rx0, tx0, ..., ctrl. */
int vn_dev_config_queue(struct vn_dev *dev, unsigned qidx, uint16_t size, uint64_t desc,
                        uint64_t avail, uint64_t used, uint16_t vector);
/* DRIVER_OK: map rings and start the workers. Returns 0, or -1 when a ring
 * is unusable (the caller sets DEVICE_NEEDS_RESET). */
int vn_dev_start(struct vn_dev *dev, uint64_t features);
/* Stop and join the workers and forget all queue state (device reset). */
void vn_dev_reset(struct vn_dev *dev);

void vn_dev_pause_workers(struct vn_dev *dev);
void vn_dev_resume_workers(struct vn_dev *dev);

void vn_dev_set_link(struct vn_dev *dev, bool up);
void vn_dev_set_announce(struct vn_dev *dev, bool on);
bool vn_dev_get_announce(struct vn_dev *dev);
bool vn_dev_get_needs_reset(struct vn_dev *dev);
void vn_dev_set_config_vector(struct vn_dev *dev, uint16_t vector);
void vn_dev_get_mac(struct vn_dev *dev, uint8_t mac_out[6]);
void vn_dev_get_filter(struct vn_dev *dev, struct vn_rx_filter *out);

/* Steering (context thread). A change pauses the workers (transmit queues
 * drained first), applies, and resumes; frames already steered under the old
 * rule are placed before any frame under the new one. */
void vn_dev_steering_begin(struct vn_dev *dev);
void vn_dev_steering_commit(struct vn_dev *dev, unsigned active_qps);
void vn_dev_request_policy(struct vn_dev *dev, int policy);
void vn_dev_apply_requested_policy(struct vn_dev *dev);
void vn_dev_steer_state(struct vn_dev *dev, uint8_t out[VN_STEER_STATE_LEN]);

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

/* True while TAP reads must wait after a switch (any thread). */
bool vn_dev_steering_hold(struct vn_dev *dev);

/* Mark the device broken (DEVICE_NEEDS_RESET) and raise the config interrupt. */
void vn_dev_fatal(struct vn_dev *dev, const char *why);

/* Interrupt coalescing of queue qidx (rx0, tx0, ...; context thread).
 * Setting wakes the worker so that the new conditions are checked at once. */
void vn_dev_set_coal(struct vn_dev *dev, unsigned qidx, struct vn_coal_params p);
struct vn_coal_params vn_dev_get_coal(struct vn_dev *dev, unsigned qidx);

/* Doorbells through a polled shared page instead of vfio-user messages;
 * before vn_server_setup(). Returns 0 or -errno. */
int vn_dev_enable_notify_polling(struct vn_dev *dev);
/* After running out of work, a worker whose previous wait was shorter than
 * this keeps looking for up to this long before it asks for a doorbell and
 * sleeps: under load that saves a doorbell and a wake-up per batch, when idle
 * it costs nothing (0: off). */
void vn_dev_set_busy_poll(struct vn_dev *dev, uint32_t usecs);
/* The context thread's command eventfd fired: pair 0's worker saw the
 * control queue kicked in polling mode, or the control queue stopped at its
 * budget with commands left (ctrl_resume): serve it. */
void vn_dev_ctrl_poll_kick(struct vn_dev *dev);

/* Doorbell for queue qidx (context thread). */
void vn_dev_doorbell(struct vn_dev *dev, unsigned qidx);

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
