/* The C datapath's interface to the control plane (vfiouser_net/csrc).
 * Sizes and values are the C headers' own: `...` lets cffi take an array's
 * length, a struct's layout and a constant from the compiler instead of a
 * copy here (only a MAC's 6 bytes and a command counter's [ok, error] pair,
 * fixed by the protocol, are written out). */

/* Layout (csrc/layout.h). */
#define VN_BAR0_SIZE ...
#define VN_COMMON_CFG_OFF ...
#define VN_COMMON_CFG_LEN ...
#define VN_ISR_OFF ...
#define VN_ISR_LEN ...
#define VN_DEVICE_CFG_OFF ...
#define VN_DEVICE_CFG_LEN ...
#define VN_STEER_STATE_OFF ...
#define VN_STEER_STATE_LEN ...
#define VN_NOTIFY_OFF ...
#define VN_NOTIFY_LEN ...
#define VN_NOTIFY_MULTIPLIER ...
#define VN_MSIX_BAR ...
#define VN_MSIX_BAR_SIZE ...
#define VN_MSIX_TABLE_OFF ...
#define VN_MSIX_PBA_OFF ...
#define VN_MAX_QUEUE_PAIRS ...
#define VN_VQ_MAX_SIZE ...
#define VN_VQ_NO_VECTOR ...
#define VN_MAC_TABLE_ENTRIES ...
#define VN_RSS_MAX_TABLE ...
#define VN_RSS_MAX_KEY_SIZE ...
#define VN_HASH_TYPES_SUPPORTED ...

enum vn_drop_reason {
    VN_DROP_BAD_CHAIN, VN_DROP_HEADER_TOO_SHORT, VN_DROP_FRAME_TOO_BIG, VN_DROP_BUFFER_TOO_SMALL,
    VN_DROP_MAC_FILTER, VN_DROP_LINK_DOWN, VN_DROP_TAP_ERROR, VN_DROP_QUEUE_BROKEN, VN_DROP_RESET,
    VN_DROP_STEER_BACKLOG, VN_DROP_QUEUE_DISABLED, VN_DROP_PAIR_NOT_READY, VN_DROP_VLAN_FILTER,
    VN_DROP__COUNT
};
enum vn_error_reason {
    VN_ERR_DESC_ADDR, VN_ERR_DESC_NEXT, VN_ERR_DESC_LOOP, VN_ERR_DESC_ORDER, VN_ERR_INDIRECT,
    VN_ERR_CHAIN_TOO_LONG, VN_ERR_AVAIL_IDX, VN_ERR_HEAD_INDEX, VN_ERR_RING_ADDR,
    VN_ERR_ZERO_LENGTH, VN_ERR__COUNT
};
enum vn_event { VN_EVENT_CONNECTED = 1, VN_EVENT_DISCONNECTED = 2, VN_EVENT_NEEDS_RESET = 3,
                VN_EVENT_CTRL = 4 };

struct vn_dir_stats {
    uint64_t packets;
    uint64_t bytes;
    uint64_t doorbells;
    uint64_t interrupts;
    uint64_t interrupts_suppressed;
    uint64_t interrupts_coalesced;
    uint64_t ring_full;
    uint64_t batches;
    uint64_t bounced;
    uint64_t steered_out;
    uint64_t drops[...];
    uint64_t errors[...];
    uint64_t avail_seen;
    uint64_t used_idx;
    uint64_t batch_hist[...];
    uint64_t size_hist[...];
    ...;
};
struct vn_qp_stats { struct vn_dir_stats rx; struct vn_dir_stats tx; };
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
    uint64_t tap_failures;
    uint64_t tap_replacements;
    uint64_t ctrl_budget_exhausted;
    uint64_t dma_refused;
    uint64_t guest_mem_faults;
    uint64_t irqs_msix_off;
    uint64_t pci_cfg_invalid;
    uint64_t rx_reselected;
    uint64_t doorbells_inline;
    uint64_t rx_inline;
    uint64_t ctrl_cmds[...][...][2];
    ...;
};
enum vn_policy { VN_POLICY_AUTO = 0, VN_POLICY_SINGLE = 1, VN_POLICY_RSS = 2,
                 VN_POLICY_RX_FOLLOWS_TX = 3, VN_POLICY__COUNT };
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
    uint16_t table[...];
    unsigned key_len;
    uint8_t key[...];
    ...;
};
struct vn_rx_filter {
    uint8_t mac[6];
    bool promisc;
    bool allmulti;
    bool uni_overflow;
    bool multi_overflow;
    unsigned n_uc, n_mc;
    uint8_t uc[...][6];
    uint8_t mc[...][6];
    bool vlan_filter;
    uint64_t vlans[...];
    ...;
};
struct vn_hooks {
    void *py;
    int (*bar_access)(void *py, uint64_t offset, uint8_t *buf, uint32_t count, int is_write);
    void (*reset)(void *py, int type);
    void (*log)(void *py, int level, const char *msg);
    void (*event)(void *py, int event);
};

struct vn_dev;
struct vn_dev *vn_dev_new(unsigned max_qps, const uint8_t mac[6], uint32_t mtu);
void vn_dev_free(struct vn_dev *dev);
void vn_dev_set_hooks(struct vn_dev *dev, const struct vn_hooks *hooks);
void vn_dev_set_tap(struct vn_dev *dev, unsigned qp, int fd);
/* Batched TAP writes through io_uring for every pair (tap_batch.h): 0, or
 * -errno and none (the kernel has no io_uring, or it is disabled). Before
 * the sandbox and before the workers start. */
int vn_dev_use_tap_batching(struct vn_dev *dev);
int vn_tap_batch_probe(void);
void vn_dev_set_tx_inline(struct vn_dev *dev, bool on);
/* Every pair writes in batches (none gave up after an io_uring error). */
bool vn_dev_tap_batching(struct vn_dev *dev);
int vn_dev_replace_taps(struct vn_dev *dev, const int *fds, unsigned n, unsigned timeout_ms);
int vn_dev_config_queue(struct vn_dev *dev, unsigned qidx, uint16_t size, uint64_t desc,
                        uint64_t avail, uint64_t used, uint16_t vector);
int vn_dev_start(struct vn_dev *dev, uint64_t features);
void vn_dev_reset(struct vn_dev *dev);
void vn_dev_set_link(struct vn_dev *dev, bool up);
void vn_dev_set_announce(struct vn_dev *dev, bool on);
bool vn_dev_get_announce(struct vn_dev *dev);
bool vn_dev_get_needs_reset(struct vn_dev *dev);
void vn_dev_set_config_vector(struct vn_dev *dev, uint16_t vector);
uint8_t vn_dev_take_isr(struct vn_dev *dev);
int vn_dev_queue_reset(struct vn_dev *dev, unsigned qidx);
int vn_dev_queue_enable(struct vn_dev *dev, unsigned qidx, uint16_t size, uint64_t desc,
                        uint64_t avail, uint64_t used, uint16_t vector);
void vn_dev_raise_isr(struct vn_dev *dev, uint8_t bits);
void vn_dev_get_mac(struct vn_dev *dev, uint8_t mac_out[6]);
void vn_dev_get_filter(struct vn_dev *dev, struct vn_rx_filter *out);
void vn_dev_fatal(struct vn_dev *dev, const char *why);
void vn_irq_raise(struct vn_dev *dev, uint16_t vector);
void vn_dev_get_qp_stats(struct vn_dev *dev, unsigned qp, struct vn_qp_stats *out);
void vn_dev_get_ctrl_stats(struct vn_dev *dev, struct vn_dir_stats *out);
void vn_dev_get_dev_stats(struct vn_dev *dev, struct vn_dev_stats *out);
uint64_t vn_dev_get_irq_count(struct vn_dev *dev, uint16_t vector);
struct vn_coal_params { uint32_t max_packets; uint32_t max_usecs; };
struct vn_coal_params vn_dev_get_coal(struct vn_dev *dev, unsigned qidx);
int vn_dev_enable_notify_polling(struct vn_dev *dev);
void vn_dev_set_busy_poll(struct vn_dev *dev, uint32_t usecs);
void vn_dev_request_policy(struct vn_dev *dev, int policy);
void vn_dev_get_steering(struct vn_dev *dev, struct vn_steer_info *out);
const char *vn_policy_name(int policy);
struct vn_ring_state {
    bool configured;
    bool ready;
    bool broken;
    bool event_idx;
    uint16_t size;
    uint16_t msix_vector;
    uint16_t last_avail;
    uint16_t used_idx;
    uint16_t avail_seen;
    uint64_t desc_gpa, avail_gpa, used_gpa;
};
int vn_dev_get_ring_state(struct vn_dev *dev, unsigned qidx, struct vn_ring_state *out);
const char *vn_drop_reason_name(int reason);
#define VN_BATCH_BUCKETS ...
#define VN_SIZE_BUCKETS ...
uint32_t vn_batch_bucket_bound(unsigned i);
uint32_t vn_size_bucket_bound(unsigned i);
const char *vn_error_reason_name(int reason);

/* RSS hashing (csrc/rss_hash.h), exported for its verification tests. */
struct vn_flow_tuple {
    uint8_t family;
    uint8_t l4;
    uint8_t addr_len;
    uint8_t src[16], dst[16];
    uint8_t sport[2], dport[2];
};
uint32_t vn_toeplitz(const uint8_t *key, size_t key_len, const uint8_t *data, size_t len);
void vn_flow_parse(const uint8_t *frame, size_t len, struct vn_flow_tuple *t);
uint32_t vn_rss_hash(const struct vn_flow_tuple *t, uint32_t types, const uint8_t *key,
                     size_t key_len, uint8_t *report);

struct vn_capture_hdr {
    uint32_t queue_pair;
    uint32_t direction;
    uint64_t timestamp_ns;
    uint32_t orig_len;
    uint32_t reserved;
};
#define VN_CAPTURE_SNAPLEN ...
int vn_capture_start(struct vn_dev *dev, int queue, int64_t count);
void vn_capture_stop(struct vn_dev *dev);
int vn_capture_recv_fd(struct vn_dev *dev);
void vn_capture_counts(struct vn_dev *dev, uint64_t *captured, uint64_t *missed);

int vn_tap_open(const char *name, bool multi_queue, char *ifname_out);
int vn_tap_probe_uso(int fd);
int vn_tap_set_flow_steering(int fd);
void vn_tap_clear_flow_steering(int fd);

int vn_server_setup(struct vn_dev *dev, void *vfu_ctx, int log_level);
int vn_server_run(struct vn_dev *dev);
void vn_server_stop(struct vn_dev *dev);

/* Control-plane callbacks, implemented in Python (vfiouser_net/device.py). */
extern "Python" int vn_py_bar_access(void *py, uint64_t offset, uint8_t *buf, uint32_t count,
                                     int is_write);
extern "Python" void vn_py_reset(void *py, int type);
extern "Python" void vn_py_log(void *py, int level, const char *msg);
extern "Python" void vn_py_event(void *py, int event);
