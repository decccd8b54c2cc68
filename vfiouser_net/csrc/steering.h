/* The steering engine: which receive queue a frame from the host goes to.
 *
 * One policy is active at a time (the seed design's rules, on top of the
 * standardised RSS): SINGLE (pair 0), RSS (the guest's Toeplitz key,
 * indirection table and hash types), RX_FOLLOWS_TX (the queue the guest last
 * transmitted the flow on, learned in a bounded table with expiry; unseen
 * flows spread by hash), and AUTO (RSS once the guest configured it,
 * RX_FOLLOWS_TX before). The configuration changes only while the workers are
 * paused (device.c, vn_dev_steering_changed); the flow table is updated by
 * the workers concurrently, one atomic word per flow. */
#ifndef VN_STEERING_H
#define VN_STEERING_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rss_hash.h"

#define VN_RSS_MAX_TABLE 128
#define VN_FLOW_TABLE_SIZE 4096
#define VN_FLOW_EXPIRY_MS 3000
/* Longest a switch holds new frames back for the guest to drain its rings. */
#define VN_STEER_DRAIN_MAX_NS (200ull * 1000 * 1000)
/* Frames steered under the old rule are placed before anything newer is
 * read, however long their ring stays full, up to this bound: past it, a
 * pair whose driver stopped refilling drops them (steer_backlog) instead of
 * holding back every pair's receive for ever. */
#define VN_STEER_OLD_MAX_NS (2000ull * 1000 * 1000)
/* Linux writes used_event just before it hands its last batch to the stack
 * (virtqueue_napi_complete): give that batch time to reach the sockets. */
#define VN_STEER_DRAIN_GRACE_NS (5ull * 1000 * 1000)

enum vn_policy {
    VN_POLICY_AUTO = 0,
    VN_POLICY_SINGLE = 1,
    VN_POLICY_RSS = 2,
    VN_POLICY_RX_FOLLOWS_TX = 3,
    VN_POLICY__COUNT
};

struct vn_rss_config {
    bool configured;          /* an RSS_CONFIG was accepted */
    uint32_t hash_types;      /* for steering (RSS) and for hash reports */
    uint16_t table_len;       /* power of two, <= VN_RSS_MAX_TABLE */
    uint16_t unclassified;
    uint16_t table[VN_RSS_MAX_TABLE];
    uint8_t key_len;
    uint8_t key[VN_RSS_MAX_KEY_SIZE];
};

struct vn_steering {
    int policy;               /* what the operator chose */
    struct vn_rss_config rss;
    _Atomic uint64_t flows[VN_FLOW_TABLE_SIZE];
};

const char *vn_policy_name(int policy);
void vn_steering_reset(struct vn_steering *s);
int vn_steering_effective(const struct vn_steering *s);
/* The rule's inputs, changed only through these (and only between
 * vn_dev_steering_begin and _commit, which pause the workers and hand frames
 * of the old rule over): the driver's RSS_CONFIG or HASH_CONFIG, as
 * vn_rss_config_parse gave it, and the operator's policy. */
void vn_steering_set_rss(struct vn_steering *s, const struct vn_rss_config *cfg);
void vn_steering_set_policy(struct vn_steering *s, int policy);

/* Receive queue (< active) for a frame; also the hash and its type for the
 * guest's header when hash reports are on. */
unsigned vn_steer_rx(struct vn_steering *s, const uint8_t *frame, size_t len, unsigned active,
                     uint32_t *hash, uint8_t *report);
/* The same for a frame that queue pair `reader` read off its TAP queue:
 * under rx-follows-tx a flow the guest has not sent yet stays with its
 * reader (the kernel keeps a flow on one TAP queue, so that is stable, and
 * the frame goes straight into the reader's guest buffers, uncopied) when
 * that pair is in use; else, as vn_steer_rx, by the flow's hash. */
unsigned vn_steer_rx_read(struct vn_steering *s, const uint8_t *frame, size_t len,
                          unsigned active, unsigned reader, uint32_t *hash, uint8_t *report);
/* Learn, from a frame the guest sent on txq, where that flow's replies go. */
void vn_steer_learn_tx(struct vn_steering *s, const uint8_t *frame, size_t len, unsigned txq);

/* Parse and validate VIRTIO_NET_CTRL_MQ_RSS_CONFIG / HASH_CONFIG data.
 * Returns 0 and fills *out (and *max_tx_vq for RSS), or -1 when malformed or
 * naming queues past max_pairs. */
int vn_rss_config_parse(const uint8_t *data, uint32_t len, unsigned max_pairs,
                        struct vn_rss_config *out, uint16_t *max_tx_vq);
int vn_hash_config_parse(const uint8_t *data, uint32_t len, struct vn_rss_config *out);

#endif
