/* The queue pair worker (worker.c): what the rest of the datapath calls. One
 * thread per pair moves frames between its rings and its TAP queue; the
 * context thread may run a pass for it while it sleeps (inline doorbells);
 * frames steered from another pair arrive in its inbox. */
#ifndef VN_WORKER_H
#define VN_WORKER_H

#include <stdbool.h>

struct vn_dev;
struct vn_qp;
struct vn_pkt;

/* The thread's body; arg is the struct vn_qp. */
void *vn_qp_worker(void *arg);

/* Frames a transmit doorbell may send on the context thread. */
#define VN_TX_INLINE_MAX 16
/* A transmit doorbell handled on the calling thread while the worker sleeps
 * (and the replies it finds in the TAP placed too); false: wake the worker. */
bool vn_qp_tx_inline(struct vn_qp *qp);

/* Packets in flight between queues: one steered frame placed (or dropped),
 * and a pair's inbox emptied, each frame counted as dropped for reason. */
void vn_pkt_place_done(struct vn_dev *dev, struct vn_pkt *pkt);
void vn_inbox_drain(struct vn_dev *dev, struct vn_qp *qp, int drop_reason);

#endif
