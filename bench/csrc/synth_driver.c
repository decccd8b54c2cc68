/* A synthetic virtio-net driver's hot loop, for the device-level benchmark.
 *
 * The Python harness has already negotiated, mapped guest memory (a memfd)
 * into the device, set up the queues, handed MSI-X eventfds over and set
 * DRIVER_OK. This program inherits the memfd, the vfio-user socket and the
 * interrupt eventfds and drives one queue per pair, one thread per pair, the
 * way Linux's virtio_net does with VIRTIO_F_RING_EVENT_IDX:
 *
 *  tx  keeps the ring full of pre-built frames (12-byte header + frame),
 *      reaps used entries, kicks only when vring_need_event() says so, and
 *      when the ring is full sets used_event 3/4 of the outstanding ahead
 *      (virtqueue_enable_cb_delayed), re-checks, then sleeps on its
 *      interrupt eventfd.
 *  rx  posts buffers, consumes used entries in NAPI-like polls of 64,
 *      refills when more than 32 are free (virtnet_receive), and when a poll
 *      ends short sets used_event = last seen (virtqueue_enable_cb_prepare),
 *      re-checks, then sleeps on its interrupt eventfd.
 *
 * Doorbells are VFIO_USER_REGION_WRITE messages of the queue index to its
 * notify address in BAR0, posted (no-reply flag), as QEMU sends them. A
 * reader thread drains whatever the server sends on the socket (nothing is
 * expected) and counts it.
 *
 * Timeline: warm-up, measured window, drain (no new buffers; wait for the
 * device to use what it has, so its counters and ours can be compared).
 * Prints one JSON line on stdout. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench_common.h"

/* vfio-user */
#define VFIO_USER_REGION_WRITE 10
#define VFIO_USER_F_NO_REPLY 0x10
#define VFIO_USER_HDR_LEN 16
#define DOORBELL_MSG_LEN (VFIO_USER_HDR_LEN + 16 + 2)

/* split ring */
#define VRING_DESC_F_WRITE 2
#define NET_HDR_NUM_BUFFERS_OFF 10

#define MAX_QUEUES 16
#define RX_BUDGET 64
#define IDLE_WAIT_MS 100

enum dir { DIR_TX, DIR_RX };

struct counters {
    uint64_t packets, bytes, doorbells, interrupts, irq_waits, idle_timeouts, missed;
};

struct queue {
    /* parameters */
    unsigned idx, size;
    uint64_t desc_gpa, avail_gpa, used_gpa, notify_off, buf_gpa;
    uint32_t stride;
    int irq_fd;
    /* ring pointers */
    uint8_t *desc, *avail, *used, *buf;
    /* driver state */
    uint16_t avail_idx, last_used, kicked_idx;
    uint16_t *ids; /* free (tx) or to-refill (rx) descriptor ids */
    unsigned nids;
    unsigned rx_more; /* rx: buffers still to come for the current frame */
    uint64_t rx_frame_len;
    /* results */
    struct counters c, w0, w1;
    double t0, t1;
    uint64_t foreign, errors;
    char error[160];
    pthread_t thread;
};

static struct {
    enum dir dir;
    size_t frame;
    unsigned flows, batch;
    double warmup, seconds, drain;
    uint8_t dst[6], src[6];
    int sock;
    unsigned region;
    uint8_t *mem;
    uint64_t mem_base, mem_size;
    unsigned nq;
    struct queue q[MAX_QUEUES];
    double t_start;
} g;

static pthread_mutex_t sock_lock = PTHREAD_MUTEX_INITIALIZER;
static uint16_t next_msg_id;
static atomic_bool stop_all;
static atomic_int fatal;
static atomic_uint_fast64_t srv_messages, srv_bytes, srv_commands, srv_replies;
static atomic_bool srv_closed;

/* ------------------------------------------------------------------------ */

static uint8_t *gpa(uint64_t addr, uint64_t len)
{
    if (addr < g.mem_base || len > g.mem_size || addr - g.mem_base > g.mem_size - len) {
        fprintf(stderr, "guest address 0x%llx+0x%llx outside memory\n", (unsigned long long)addr,
                (unsigned long long)len);
        exit(2);
    }
    return g.mem + (addr - g.mem_base);
}

static void q_fail(struct queue *q, const char *what)
{
    if (q->error[0] == '\0')
        snprintf(q->error, sizeof(q->error), "queue %u: %s", q->idx, what);
    atomic_store(&fatal, 1);
    atomic_store(&stop_all, true);
}

/* Ring fields (virtio 1.x split ring, all little-endian). */
static inline uint8_t *desc_at(struct queue *q, unsigned i) { return q->desc + 16u * i; }
static inline uint8_t *avail_idx_p(struct queue *q) { return q->avail + 2; }
static inline uint8_t *avail_ring_p(struct queue *q, uint16_t i) { return q->avail + 4 + 2u * (i & (q->size - 1)); }
static inline uint8_t *used_event_p(struct queue *q) { return q->avail + 4 + 2u * q->size; }
static inline uint8_t *used_idx_p(struct queue *q) { return q->used + 2; }
static inline uint8_t *used_elem_p(struct queue *q, uint16_t i) { return q->used + 4 + 8u * (i & (q->size - 1)); }
static inline uint8_t *avail_event_p(struct queue *q) { return q->used + 4 + 8u * q->size; }

static inline bool vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old);
}

/* --- doorbells ------------------------------------------------------------ */

static bool send_all(const uint8_t *p, size_t len)
{
    while (len > 0) {
        ssize_t n = send(g.sock, p, len, MSG_NOSIGNAL);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            /* The server is behind: a guest's vCPU would wait here too. */
            struct pollfd pfd = { .fd = g.sock, .events = POLLOUT };
            if (poll(&pfd, 1, 5000) <= 0)
                return false;
            continue;
        }
        return false;
    }
    return true;
}

static void doorbell(struct queue *q)
{
    uint8_t m[DOORBELL_MSG_LEN];
    pthread_mutex_lock(&sock_lock);
    put_le16(m, next_msg_id++);
    put_le16(m + 2, VFIO_USER_REGION_WRITE);
    put_le32(m + 4, DOORBELL_MSG_LEN);
    put_le32(m + 8, VFIO_USER_F_NO_REPLY); /* command, posted */
    put_le32(m + 12, 0);
    put_le64(m + 16, q->notify_off); /* struct vfio_user_region_access */
    put_le32(m + 24, g.region);
    put_le32(m + 28, 2);
    put_le16(m + 32, (uint16_t)q->idx);
    bool ok = send_all(m, sizeof(m));
    pthread_mutex_unlock(&sock_lock);
    if (!ok)
        q_fail(q, "doorbell send failed");
    q->c.doorbells++;
}

/* Publish avail->idx and kick if the device asked for it (virtqueue_kick). */
static void publish_and_kick(struct queue *q)
{
    atomic_thread_fence(memory_order_release); /* ring entries before the index */
    le16_store(avail_idx_p(q), q->avail_idx);
    atomic_thread_fence(memory_order_seq_cst); /* index before avail_event */
    uint16_t event = le16_load(avail_event_p(q));
    if (vring_need_event(event, q->avail_idx, q->kicked_idx))
        doorbell(q);
    q->kicked_idx = q->avail_idx;
}

/* Sleep on the interrupt eventfd until `deadline`; counts what it read.
 * `event`/`old`: the used_event just armed and last_used at that moment. A
 * wait that times out although the used index has passed `event` is an
 * interrupt the device owed us (counted as missed). */
static void wait_irq(struct queue *q, double deadline, uint16_t event, uint16_t old)
{
    double left = deadline - now_s();
    int ms = left <= 0 ? 0 : (int)(left * 1000.0) + 1;
    bool idle = ms > IDLE_WAIT_MS;
    if (idle)
        ms = IDLE_WAIT_MS;
    struct pollfd pfd = { .fd = q->irq_fd, .events = POLLIN };
    q->c.irq_waits++;
    int r = poll(&pfd, 1, ms);
    if (r > 0) {
        uint64_t v;
        if (read(q->irq_fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
            q->c.interrupts += v;
    } else if (r == 0 && idle) {
        /* A whole idle period: not the race of an interrupt on its way. */
        q->c.idle_timeouts++;
        if (vring_need_event(event, le16_load(used_idx_p(q)), old))
            q->c.missed++;
    }
}

/* Interrupts that arrived but were not waited for (counted at the end). */
static void collect_irq(struct queue *q)
{
    uint64_t v;
    if (read(q->irq_fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
        q->c.interrupts += v;
}

/* --- phases --------------------------------------------------------------- */

enum phase { PH_WARMUP, PH_WINDOW, PH_DRAIN };

static enum phase phase_of(struct queue *q, double *next)
{
    double t = now_s();
    double w0 = g.t_start + g.warmup, w1 = w0 + g.seconds;
    if (q->t0 == 0 && t >= w0) {
        q->w0 = q->c;
        q->t0 = t;
    }
    if (q->t1 == 0 && t >= w1) {
        q->w1 = q->c;
        q->t1 = t;
    }
    if (atomic_load_explicit(&stop_all, memory_order_relaxed) && q->t1 == 0) {
        q->w1 = q->c;
        q->t1 = t;
    }
    if (q->t1 != 0)
        return PH_DRAIN;
    *next = q->t0 == 0 ? w0 : w1;
    return q->t0 == 0 ? PH_WARMUP : PH_WINDOW;
}

/* --- tx ------------------------------------------------------------------- */

static unsigned tx_reap(struct queue *q)
{
    unsigned n = 0;
    uint16_t used = le16_load(used_idx_p(q));
    if (used == q->last_used)
        return 0;
    if ((uint16_t)(used - q->last_used) > (uint16_t)(q->avail_idx - q->last_used)) {
        q_fail(q, "used index ahead of what was made available");
        return 0;
    }
    atomic_thread_fence(memory_order_acquire); /* index before the entries */
    while (q->last_used != used) {
        uint8_t *e = used_elem_p(q, q->last_used);
        uint32_t id = le32_load(e);
        if (id >= q->size) {
            q_fail(q, "used id out of range");
            return n;
        }
        q->ids[q->nids++] = (uint16_t)id;
        q->last_used++;
        q->c.packets++;
        q->c.bytes += g.frame;
        n++;
    }
    return n;
}

static void *tx_thread(void *arg)
{
    struct queue *q = arg;
    uint32_t len = BENCH_VNET_HDR_LEN + (uint32_t)g.frame;
    for (unsigned i = 0; i < q->size; i++) {
        uint8_t *b = q->buf + (size_t)i * q->stride;
        memset(b, 0, BENCH_VNET_HDR_LEN);
        build_frame(b + BENCH_VNET_HDR_LEN, g.frame, g.dst, g.src, (q->idx / 2 * q->size + i) % g.flows);
        uint8_t *d = desc_at(q, i);
        le64_store(d, q->buf_gpa + (uint64_t)i * q->stride);
        le32_store(d + 8, len);
        le16_store(d + 12, 0);
        le16_store(d + 14, 0);
        q->ids[q->nids++] = (uint16_t)(q->size - 1 - i);
    }
    for (;;) {
        double next = 0;
        enum phase ph = phase_of(q, &next);
        if (ph == PH_DRAIN)
            break;
        tx_reap(q);
        if (q->nids > 0) {
            /* start_xmit: one frame after the other, the kick decided once
             * per batch (xmit_more). */
            unsigned n = q->nids < g.batch ? q->nids : g.batch;
            for (unsigned i = 0; i < n; i++) {
                uint16_t id = q->ids[--q->nids];
                le16_store(avail_ring_p(q, q->avail_idx), id);
                q->avail_idx++;
            }
            publish_and_kick(q);
            continue;
        }
        /* Ring full: virtqueue_enable_cb_delayed, re-check, sleep. */
        uint16_t bufs = (uint16_t)((uint16_t)(q->avail_idx - q->last_used) * 3 / 4);
        le16_store(used_event_p(q), (uint16_t)(q->last_used + bufs));
        atomic_thread_fence(memory_order_seq_cst);
        if ((uint16_t)(le16_load(used_idx_p(q)) - q->last_used) > bufs)
            continue;
        wait_irq(q, next, (uint16_t)(q->last_used + bufs), q->last_used);
        if (atomic_load(&fatal))
            break;
    }
    /* Drain: nothing new; wait until the device has used everything. */
    double end = now_s() + g.drain;
    while (q->last_used != q->avail_idx && !atomic_load(&fatal)) {
        tx_reap(q);
        if (q->last_used == q->avail_idx || now_s() > end)
            break;
        le16_store(used_event_p(q), (uint16_t)(q->avail_idx - 1));
        atomic_thread_fence(memory_order_seq_cst);
        if (le16_load(used_idx_p(q)) != q->last_used)
            continue;
        double soon = now_s() + 0.05;
        wait_irq(q, soon < end ? soon : end, (uint16_t)(q->avail_idx - 1), q->last_used);
    }
    if (q->last_used != q->avail_idx && q->error[0] == '\0')
        snprintf(q->error, sizeof(q->error), "queue %u: %u frames still in flight after drain",
                 q->idx, (unsigned)(uint16_t)(q->avail_idx - q->last_used));
    collect_irq(q);
    return NULL;
}

/* --- rx ------------------------------------------------------------------- */

static bool ours(const uint8_t *f, uint64_t len)
{
    return len >= 14 + 20 + 8 && f[12] == 0x08 && f[13] == 0x00 && f[14 + 9] == 17 &&
           f[14 + 20 + 2] == 0 && f[14 + 20 + 3] == BENCH_UDP_DST_PORT;
}

/* One NAPI poll: up to `budget` used buffers. Returns how many. */
static unsigned rx_poll(struct queue *q, unsigned budget)
{
    unsigned got = 0;
    while (got < budget) {
        uint16_t used = le16_load(used_idx_p(q));
        if (used == q->last_used)
            break;
        if ((uint16_t)(used - q->last_used) > (uint16_t)(q->avail_idx - q->last_used)) {
            q_fail(q, "used index ahead of what was made available");
            break;
        }
        atomic_thread_fence(memory_order_acquire);
        uint8_t *e = used_elem_p(q, q->last_used);
        uint32_t id = le32_load(e), len = le32_load(e + 4);
        if (id >= q->size || len > q->stride) {
            q_fail(q, "used element out of range");
            break;
        }
        q->last_used++;
        got++;
        q->ids[q->nids++] = (uint16_t)id;
        const uint8_t *b = q->buf + (size_t)id * q->stride;
        if (q->rx_more == 0) {
            /* First buffer of a frame: the header says how many follow. */
            if (len < BENCH_VNET_HDR_LEN + 14) {
                q->errors++;
                continue;
            }
            uint16_t nb = get_le16(b + NET_HDR_NUM_BUFFERS_OFF);
            if (nb == 0) {
                q->errors++;
                nb = 1;
            }
            if (!ours(b + BENCH_VNET_HDR_LEN, len - BENCH_VNET_HDR_LEN))
                q->foreign++;
            q->rx_more = nb - 1u;
            q->rx_frame_len = len - BENCH_VNET_HDR_LEN;
        } else {
            q->rx_more--;
            q->rx_frame_len += len;
        }
        if (q->rx_more == 0) {
            q->c.packets++;
            q->c.bytes += q->rx_frame_len;
        }
    }
    return got;
}

static void rx_refill(struct queue *q)
{
    if (q->nids == 0)
        return;
    for (unsigned i = 0; i < q->nids; i++) {
        le16_store(avail_ring_p(q, q->avail_idx), q->ids[i]);
        q->avail_idx++;
    }
    q->nids = 0;
    publish_and_kick(q);
}

static void *rx_thread(void *arg)
{
    struct queue *q = arg;
    for (unsigned i = 0; i < q->size; i++) {
        uint8_t *d = desc_at(q, i);
        le64_store(d, q->buf_gpa + (uint64_t)i * q->stride);
        le32_store(d + 8, q->stride);
        le16_store(d + 12, VRING_DESC_F_WRITE);
        le16_store(d + 14, 0);
        q->ids[q->nids++] = (uint16_t)i;
    }
    le16_store(used_event_p(q), q->last_used);
    rx_refill(q);
    unsigned refill_min = (RX_BUDGET < q->size ? RX_BUDGET : q->size) / 2;
    for (;;) {
        double next = 0;
        enum phase ph = phase_of(q, &next);
        if (ph == PH_DRAIN)
            break;
        unsigned got = rx_poll(q, RX_BUDGET);
        if (atomic_load(&fatal))
            break;
        if (q->nids > refill_min)
            rx_refill(q);
        if (got == RX_BUDGET)
            continue; /* budget used up: poll again */
        /* napi_complete: virtqueue_enable_cb_prepare + virtqueue_poll. */
        le16_store(used_event_p(q), q->last_used);
        atomic_thread_fence(memory_order_seq_cst);
        if (le16_load(used_idx_p(q)) != q->last_used)
            continue;
        wait_irq(q, next, q->last_used, q->last_used);
    }
    /* Drain: no more refills; take what the device fills, until it has
     * nothing left or goes quiet. */
    double end = now_s() + g.drain, quiet_since = now_s();
    while (q->last_used != q->avail_idx && !atomic_load(&fatal)) {
        if (rx_poll(q, q->size) > 0)
            quiet_since = now_s();
        double t = now_s();
        if (q->last_used == q->avail_idx || t > end || t - quiet_since > 0.2)
            break;
        le16_store(used_event_p(q), q->last_used);
        atomic_thread_fence(memory_order_seq_cst);
        if (le16_load(used_idx_p(q)) != q->last_used)
            continue;
        wait_irq(q, t + 0.05, q->last_used, q->last_used);
    }
    collect_irq(q);
    return NULL;
}

/* --- socket reader -------------------------------------------------------- */

static void *reader_thread(void *arg)
{
    (void)arg;
    static uint8_t buf[1 << 16];
    size_t have = 0;
    while (!atomic_load(&stop_all)) {
        struct pollfd pfd = { .fd = g.sock, .events = POLLIN };
        int r = poll(&pfd, 1, 50);
        if (r <= 0)
            continue;
        ssize_t n = recv(g.sock, buf + have, sizeof(buf) - have, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                continue;
            atomic_store(&srv_closed, true);
            break;
        }
        if (n == 0) {
            atomic_store(&srv_closed, true);
            atomic_store(&fatal, 1);
            atomic_store(&stop_all, true);
            break;
        }
        srv_bytes += (uint64_t)n;
        have += (size_t)n;
        for (;;) {
            if (have < VFIO_USER_HDR_LEN)
                break;
            uint32_t size = get_le32(buf + 4), flags = get_le32(buf + 8);
            if (size < VFIO_USER_HDR_LEN || size > sizeof(buf)) {
                have = 0; /* unparseable: count bytes only */
                break;
            }
            if (have < size)
                break;
            srv_messages++;
            if ((flags & 0xf) == 0)
                srv_commands++;
            else
                srv_replies++;
            fprintf(stderr, "server sent cmd %u flags 0x%x size %u (ignored)\n", get_le16(buf + 2),
                    flags, size);
            memmove(buf, buf + size, have - size);
            have -= size;
        }
    }
    return NULL;
}

/* --- main ----------------------------------------------------------------- */

static void usage(void)
{
    die("usage: synth_driver --sock-fd FD --mem-fd FD --mem-size N [--mem-base GPA] "
        "--direction tx|rx --frame-bytes N --seconds S [--warmup S] [--drain S] "
        "[--flows N] [--batch N] --dst-mac M --src-mac M [--region N] "
        "--queue IDX:SIZE:DESC:AVAIL:USED:NOTIFY:IRQFD:BUF:STRIDE ...");
}

static void parse_queue(const char *s)
{
    if (g.nq >= MAX_QUEUES)
        die("too many queues");
    struct queue *q = &g.q[g.nq++];
    long long v[9];
    if (sscanf(s, "%lli:%lli:%lli:%lli:%lli:%lli:%lli:%lli:%lli", &v[0], &v[1], &v[2], &v[3],
               &v[4], &v[5], &v[6], &v[7], &v[8]) != 9)
        usage();
    q->idx = (unsigned)v[0];
    q->size = (unsigned)v[1];
    q->desc_gpa = v[2];
    q->avail_gpa = v[3];
    q->used_gpa = v[4];
    q->notify_off = v[5];
    q->irq_fd = (int)v[6];
    q->buf_gpa = v[7];
    q->stride = (uint32_t)v[8];
    if (q->size == 0 || q->size > 32768 || (q->size & (q->size - 1)))
        die("queue size must be a power of two");
}

static void print_counters(const char *name, const struct counters *c, bool comma)
{
    printf("\"%s\": {\"packets\": %llu, \"bytes\": %llu, \"doorbells\": %llu, "
           "\"interrupts\": %llu, \"irq_waits\": %llu, \"idle_timeouts\": %llu, "
           "\"missed_interrupts\": %llu}%s",
           name, (unsigned long long)c->packets, (unsigned long long)c->bytes,
           (unsigned long long)c->doorbells, (unsigned long long)c->interrupts,
           (unsigned long long)c->irq_waits, (unsigned long long)c->idle_timeouts,
           (unsigned long long)c->missed, comma ? ", " : "");
}

static struct counters sub(struct counters a, struct counters b)
{
    return (struct counters){ a.packets - b.packets, a.bytes - b.bytes, a.doorbells - b.doorbells,
                              a.interrupts - b.interrupts, a.irq_waits - b.irq_waits,
                              a.idle_timeouts - b.idle_timeouts, a.missed - b.missed };
}

static void add(struct counters *a, struct counters b)
{
    a->packets += b.packets;
    a->bytes += b.bytes;
    a->doorbells += b.doorbells;
    a->interrupts += b.interrupts;
    a->irq_waits += b.irq_waits;
    a->idle_timeouts += b.idle_timeouts;
    a->missed += b.missed;
}

int main(int argc, char **argv)
{
    int mem_fd = -1;
    const char *dir = NULL;
    g.sock = -1;
    g.flows = 16;
    g.batch = 32;
    g.warmup = 0.5;
    g.drain = 2.0;
    g.seconds = 5.0;
    bool have_dst = false, have_src = false;
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(k, "--sock-fd"))
            g.sock = (int)parse_u64(v, k);
        else if (!strcmp(k, "--mem-fd"))
            mem_fd = (int)parse_u64(v, k);
        else if (!strcmp(k, "--mem-size"))
            g.mem_size = parse_u64(v, k);
        else if (!strcmp(k, "--mem-base"))
            g.mem_base = parse_u64(v, k);
        else if (!strcmp(k, "--direction"))
            dir = v;
        else if (!strcmp(k, "--frame-bytes"))
            g.frame = check_frame_bytes(parse_u64(v, k));
        else if (!strcmp(k, "--seconds"))
            g.seconds = parse_double(v, k);
        else if (!strcmp(k, "--warmup"))
            g.warmup = parse_double(v, k);
        else if (!strcmp(k, "--drain"))
            g.drain = parse_double(v, k);
        else if (!strcmp(k, "--flows"))
            g.flows = (unsigned)parse_u64(v, k);
        else if (!strcmp(k, "--batch"))
            g.batch = (unsigned)parse_u64(v, k);
        else if (!strcmp(k, "--region"))
            g.region = (unsigned)parse_u64(v, k);
        else if (!strcmp(k, "--dst-mac"))
            parse_mac(v, g.dst), have_dst = true;
        else if (!strcmp(k, "--src-mac"))
            parse_mac(v, g.src), have_src = true;
        else if (!strcmp(k, "--queue"))
            parse_queue(v);
        else
            usage();
    }
    if (g.sock < 0 || mem_fd < 0 || g.mem_size == 0 || dir == NULL || g.frame == 0 || g.nq == 0 ||
        g.flows == 0 || g.batch == 0)
        usage();
    if (!strcmp(dir, "tx"))
        g.dir = DIR_TX;
    else if (!strcmp(dir, "rx"))
        g.dir = DIR_RX;
    else
        usage();
    if (g.dir == DIR_TX && (!have_dst || !have_src))
        die("tx needs --dst-mac and --src-mac");
    signal(SIGPIPE, SIG_IGN);

    g.mem = mmap(NULL, g.mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    if (g.mem == MAP_FAILED) {
        perror("mmap guest memory");
        return 2;
    }
    for (unsigned i = 0; i < g.nq; i++) {
        struct queue *q = &g.q[i];
        q->desc = gpa(q->desc_gpa, 16u * q->size);
        q->avail = gpa(q->avail_gpa, 6u + 2u * q->size);
        q->used = gpa(q->used_gpa, 6u + 8u * q->size);
        q->buf = gpa(q->buf_gpa, (uint64_t)q->stride * q->size);
        if (q->stride < BENCH_VNET_HDR_LEN + g.frame)
            die("buffer stride too small for the frame");
        q->ids = calloc(q->size, sizeof(*q->ids));
        if (q->ids == NULL)
            die("out of memory");
        /* The harness set the queue up and never used it: a fresh ring. */
        if (le16_load(avail_idx_p(q)) != 0 || le16_load(used_idx_p(q)) != 0)
            die("queue not fresh (avail or used index not 0)");
    }

    pthread_t reader;
    if (pthread_create(&reader, NULL, reader_thread, NULL) != 0)
        die("pthread_create");
    g.t_start = now_s();
    for (unsigned i = 0; i < g.nq; i++)
        if (pthread_create(&g.q[i].thread, NULL, g.dir == DIR_TX ? tx_thread : rx_thread,
                           &g.q[i]) != 0)
            die("pthread_create");
    for (unsigned i = 0; i < g.nq; i++)
        pthread_join(g.q[i].thread, NULL);
    atomic_store(&stop_all, true);
    pthread_join(reader, NULL);

    struct counters win = { 0 }, tot = { 0 };
    double pps = 0, span = 0;
    uint64_t foreign = 0, errors = 0;
    printf("{\"direction\": \"%s\", \"frame_bytes\": %zu, \"queues\": %u, \"per_queue\": [",
           dir, g.frame, g.nq);
    for (unsigned i = 0; i < g.nq; i++) {
        struct queue *q = &g.q[i];
        if (q->t0 == 0) { /* stopped before the window began */
            q->t0 = q->t1;
            q->w0 = q->w1;
        }
        struct counters w = sub(q->w1, q->w0);
        double secs = q->t1 - q->t0;
        add(&win, w);
        add(&tot, q->c);
        if (secs > 0)
            pps += (double)w.packets / secs;
        span += secs / g.nq;
        foreign += q->foreign;
        errors += q->errors;
        printf("{\"queue\": %u, \"seconds\": %.6f, ", q->idx, secs);
        print_counters("window", &w, true);
        print_counters("total", &q->c, true);
        printf("\"error\": \"%s\"}%s", q->error, i + 1 < g.nq ? ", " : "");
    }
    printf("], \"seconds\": %.6f, \"pps\": %.1f, ", span, pps);
    print_counters("window", &win, true);
    print_counters("total", &tot, true);
    printf("\"foreign\": %llu, \"bad_frames\": %llu, \"server_messages\": %llu, "
           "\"server_bytes\": %llu, \"server_commands\": %llu, \"server_replies\": %llu, "
           "\"server_closed\": %s, \"fatal\": %s}\n",
           (unsigned long long)foreign, (unsigned long long)errors,
           (unsigned long long)srv_messages, (unsigned long long)srv_bytes,
           (unsigned long long)srv_commands, (unsigned long long)srv_replies,
           atomic_load(&srv_closed) ? "true" : "false", atomic_load(&fatal) ? "true" : "false");
    fflush(stdout);
    return atomic_load(&fatal) ? 1 : 0;
}
