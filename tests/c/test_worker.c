/* The queue-pair worker (worker.c) driven through real rings: the worker
 * thread runs as in the daemon, with one end of an AF_UNIX datagram socket
 * pair in place of the TAP queue (one datagram = one frame with its 12-byte
 * virtio-net header, as a TAP with IFF_VNET_HDR). Covers mergeable rx buffers
 * (num_buffers), the rx filter, malformed rx/tx chains returned with length
 * 0, tx to the TAP, and a corrupt ring breaking the device. */
#include <errno.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "ctrl.h"
#include "device.h"
#include "fake_driver.h"
#include "le.h"
#include "net_hdr.h"

#define F(bit) (1ull << (bit))
#define QSIZE 64
#define RX_VECTOR 1
#define TX_VECTOR 2
#define CONFIG_VECTOR 0
#define TIMEOUT_MS 10000

static const uint8_t MAC[6] = { 0x52, 0x54, 0x00, 0x00, 0x00, 0x01 };
static const uint8_t OTHER[6] = { 0x52, 0x54, 0x00, 0x00, 0x00, 0x09 };

struct wfx {
    struct vn_dev *dev;
    struct fd_guest g;
    struct fd_vq rxq, txq;
    int sock[2];   /* [0]: the device's "TAP", [1]: the host side */
};

static void quiet_log(void *py, int level, const char *msg)
{
    (void)py;
    (void)level;
    (void)msg;
}

static struct wfx *wfx_new(void)
{
    struct wfx *w = calloc(1, sizeof(*w));
    assert_non_null(w);
    w->dev = vn_dev_new(1, MAC, 1500);
    assert_non_null(w->dev);
    struct vn_hooks h = { .log = quiet_log };
    vn_dev_set_hooks(w->dev, &h);
    w->dev->vfu = &fd_fake_vfu_ctx;
    fd_irq_reset();
    fd_guest_init(&w->g, &w->dev->mem);
    fd_vq_init(&w->rxq, &w->g, 0, QSIZE);
    fd_vq_init(&w->txq, &w->g, 0, QSIZE);
    assert_int_equal(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, w->sock), 0);
    int sz = 1 << 20;
    setsockopt(w->sock[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
    setsockopt(w->sock[1], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
    vn_dev_set_tap(w->dev, 0, w->sock[0]);
    assert_int_equal(vn_dev_config_queue(w->dev, 0, QSIZE, w->rxq.desc, w->rxq.avail, w->rxq.used,
                                         RX_VECTOR),
                     0);
    assert_int_equal(vn_dev_config_queue(w->dev, 1, QSIZE, w->txq.desc, w->txq.avail, w->txq.used,
                                         TX_VECTOR),
                     0);
    vn_dev_set_config_vector(w->dev, CONFIG_VECTOR);
    return w;
}

static void start(struct wfx *w, uint64_t features)
{
    assert_int_equal(vn_dev_start(w->dev, F(VN_F_VERSION_1) | features), 0);
}

static int setup(void **state)
{
    *state = wfx_new();
    return 0;
}

/* The same, with transmit batched through io_uring (tap_batch.h). */
static int setup_batched(void **state)
{
    struct wfx *w = wfx_new();
    int r = vn_dev_use_tap_batching(w->dev);
    if (r < 0)
        fail_msg("io_uring: %s", strerror(-r));
    assert_true(vn_dev_tap_batching(w->dev));
    *state = w;
    return 0;
}

static int teardown(void **state)
{
    struct wfx *w = *state;
    vn_dev_reset(w->dev); /* joins the worker */
    fd_guest_destroy(&w->g);
    w->dev->vfu = NULL;
    vn_dev_free(w->dev);
    close(w->sock[0]);
    close(w->sock[1]);
    free(w);
    return 0;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void wait_used(struct fd_vq *q, uint16_t n)
{
    uint64_t end = now_ms() + TIMEOUT_MS;
    while ((uint16_t)(fd_vq_used_idx(q) - q->last_used) < n) {
        if (now_ms() > end)
            fail_msg("timeout waiting for %u used entries (have %u)", n,
                     (uint16_t)(fd_vq_used_idx(q) - q->last_used));
        usleep(1000);
    }
}

static struct vn_qp_stats stats(struct wfx *w)
{
    struct vn_qp_stats s;
    vn_dev_get_qp_stats(w->dev, 0, &s);
    return s;
}

#define WAIT_FOR(cond)                                                         \
    do {                                                                       \
        uint64_t end_ = now_ms() + TIMEOUT_MS;                                 \
        while (!(cond)) {                                                      \
            if (now_ms() > end_)                                               \
                fail_msg("timeout waiting for %s", #cond);                     \
            usleep(1000);                                                      \
        }                                                                      \
    } while (0)

/* A frame with its virtio-net header, as the TAP hands it over. */
static size_t make_frame(uint8_t *out, const uint8_t dst[6], size_t payload, uint8_t seed)
{
    memset(out, 0, VN_NET_HDR_LEN);
    out[VN_NET_HDR_FLAGS_OFF] = 1;          /* NEEDS_CSUM: cleared without GUEST_CSUM */
    vn_le16_put(out + VN_NET_HDR_NUM_BUFFERS_OFF, 0xbeef); /* overwritten */
    uint8_t *f = out + VN_NET_HDR_LEN;
    memcpy(f, dst, 6);
    memcpy(f + 6, OTHER, 6);
    f[12] = 0x08;
    f[13] = 0x00;
    for (size_t i = 0; i < payload; i++)
        f[14 + i] = (uint8_t)(seed + i * 3);
    return VN_NET_HDR_LEN + 14 + payload;
}

static void host_send(struct wfx *w, const uint8_t *buf, size_t len)
{
    assert_int_equal(send(w->sock[1], buf, len, 0), (ssize_t)len);
}

static ssize_t host_recv(struct wfx *w, uint8_t *buf, size_t len)
{
    struct pollfd p = { .fd = w->sock[1], .events = POLLIN };
    assert_int_equal(poll(&p, 1, TIMEOUT_MS), 1);
    return recv(w->sock[1], buf, len, 0);
}

static void post_rx(struct wfx *w, unsigned n, uint32_t len, uint64_t *gpas)
{
    for (unsigned i = 0; i < n; i++) {
        uint64_t b = fd_alloc(&w->g, i % 2, len, 64);
        if (gpas != NULL)
            gpas[i] = b;
        fd_vq_add(&w->rxq, &(struct fd_buf){ b, len, true }, 1);
    }
}

/* Mergeable rx: a 1000-byte frame over 512-byte buffers takes two of them,
 * num_buffers says so, the header's checksum hint is cleared. */
static void test_rx_mergeable(void **state)
{
    struct wfx *w = *state;
    uint64_t gpas[16];
    post_rx(w, 16, 512, gpas);
    start(w, F(VN_F_MRG_RXBUF) | F(VN_F_RING_EVENT_IDX));
    uint8_t pkt[2048], got[2048];
    size_t len = make_frame(pkt, MAC, 1000 - 14, 1);
    assert_int_equal(len, 1012);
    host_send(w, pkt, len);
    wait_used(&w->rxq, 2);
    uint32_t id, l, total = 0;
    for (unsigned i = 0; i < 2; i++) {
        assert_true(fd_vq_get_used(&w->rxq, &id, &l));
        assert_int_equal(id, i);
        fd_read(&w->g, gpas[id], got + total, l);
        total += l;
    }
    assert_int_equal(total, 1012);
    assert_int_equal(got[VN_NET_HDR_FLAGS_OFF], 0);
    assert_int_equal(vn_le16_get(got + VN_NET_HDR_NUM_BUFFERS_OFF), 2);
    assert_memory_equal(got + VN_NET_HDR_LEN, pkt + VN_NET_HDR_LEN, len - VN_NET_HDR_LEN);

    /* A small frame: one buffer (the third one, in order). */
    len = make_frame(pkt, MAC, 46, 2);
    host_send(w, pkt, len);
    wait_used(&w->rxq, 1);
    assert_true(fd_vq_get_used(&w->rxq, &id, &l));
    assert_int_equal(id, 2);
    assert_int_equal(l, len);
    fd_read(&w->g, gpas[2], got, l);
    assert_int_equal(vn_le16_get(got + VN_NET_HDR_NUM_BUFFERS_OFF), 1);
    assert_memory_equal(got + VN_NET_HDR_LEN, pkt + VN_NET_HDR_LEN, len - VN_NET_HDR_LEN);

    /* A full-size frame: 1514 + 12 bytes over three buffers. */
    len = make_frame(pkt, MAC, 1500, 3);
    host_send(w, pkt, len);
    wait_used(&w->rxq, 3);
    total = 0;
    for (unsigned i = 0; i < 3; i++) {
        assert_true(fd_vq_get_used(&w->rxq, &id, &l));
        assert_int_equal(id, 3 + i);
        fd_read(&w->g, gpas[id], got + total, l);
        total += l;
    }
    assert_int_equal(total, len);
    assert_int_equal(vn_le16_get(got + VN_NET_HDR_NUM_BUFFERS_OFF), 3);
    assert_memory_equal(got + VN_NET_HDR_LEN, pkt + VN_NET_HDR_LEN, len - VN_NET_HDR_LEN);

    struct vn_qp_stats s = stats(w);
    assert_int_equal(s.rx.packets, 3);
    assert_int_equal(s.rx.bytes, 1000 + 60 + 1514);
    fd_assert_no_errors(&s.rx);
    assert_true(fd_irq_count(RX_VECTOR) >= 1);
}

/* Mergeable rx with less room posted than a full frame: the frame waits
 * (bounce buffer) until the guest adds buffers, then spans them. */
static void test_rx_mergeable_short_of_room(void **state)
{
    struct wfx *w = *state;
    uint64_t gpas[4];
    post_rx(w, 1, 512, gpas);
    start(w, F(VN_F_MRG_RXBUF) | F(VN_F_RING_EVENT_IDX));
    uint8_t pkt[2048], got[2048];
    size_t len = make_frame(pkt, MAC, 900, 8);
    host_send(w, pkt, len);
    /* The worker runs dry and asks for a doorbell at its position. */
    WAIT_FOR(stats(w).rx.ring_full > 0 && fd_vq_avail_event(&w->rxq) == w->rxq.avail_idx);
    assert_int_equal(fd_vq_used_idx(&w->rxq), 0);
    uint16_t old = w->rxq.avail_idx;
    post_rx(w, 2, 512, gpas + 1);
    if (fd_vq_kick_needed(&w->rxq, true, old))
        vn_dev_doorbell(w->dev, 0);
    else
        fail_msg("no rx kick requested while the worker waits for buffers");
    wait_used(&w->rxq, 2);
    uint32_t id, l, total = 0;
    for (unsigned i = 0; i < 2; i++) {
        assert_true(fd_vq_get_used(&w->rxq, &id, &l));
        assert_int_equal(id, i);
        fd_read(&w->g, gpas[i], got + total, l);
        total += l;
    }
    assert_int_equal(total, len);
    assert_int_equal(vn_le16_get(got + VN_NET_HDR_NUM_BUFFERS_OFF), 2);
    assert_memory_equal(got + VN_NET_HDR_LEN, pkt + VN_NET_HDR_LEN, len - VN_NET_HDR_LEN);
    struct vn_qp_stats s = stats(w);
    assert_int_equal(s.rx.packets, 1);
    assert_int_equal(s.rx.bounced, 1);
    assert_int_equal(s.rx.drops[VN_DROP_BUFFER_TOO_SMALL], 0);
}

/* Without mergeable buffers a frame larger than the one buffer is dropped
 * (never cut), and the buffer serves the next frame. */
static void test_rx_buffer_too_small(void **state)
{
    struct wfx *w = *state;
    uint64_t gpas[1];
    post_rx(w, 1, 512, gpas);
    start(w, 0);
    uint8_t pkt[2048], got[512];
    size_t len = make_frame(pkt, MAC, 900, 9);
    host_send(w, pkt, len);
    WAIT_FOR(stats(w).rx.drops[VN_DROP_BUFFER_TOO_SMALL] == 1);
    len = make_frame(pkt, MAC, 400, 10);
    host_send(w, pkt, len);
    wait_used(&w->rxq, 1);
    uint32_t id, l;
    assert_true(fd_vq_get_used(&w->rxq, &id, &l));
    assert_int_equal(id, 0);
    assert_int_equal(l, len);
    fd_read(&w->g, gpas[0], got, l);
    assert_memory_equal(got + VN_NET_HDR_LEN, pkt + VN_NET_HDR_LEN, len - VN_NET_HDR_LEN);
    assert_int_equal(stats(w).rx.packets, 1);
}

/* Frames the rx filter refuses are dropped and counted. */
static void test_rx_filter_drop(void **state)
{
    struct wfx *w = *state;
    uint64_t gpas[4];
    post_rx(w, 4, 2048, gpas);
    start(w, F(VN_F_CTRL_VQ) | F(VN_F_CTRL_RX));
    uint8_t off[3] = { VN_CTRL_RX, VN_CTRL_RX_PROMISC, 0 };
    assert_int_equal(vn_ctrl_handle(w->dev, off, 3), VN_CTRL_OK);
    uint8_t pkt[256];
    size_t len = make_frame(pkt, OTHER, 50, 4);
    host_send(w, pkt, len);
    WAIT_FOR(stats(w).rx.drops[VN_DROP_MAC_FILTER] == 1);
    len = make_frame(pkt, MAC, 50, 5);
    host_send(w, pkt, len);
    wait_used(&w->rxq, 1);
    uint32_t id, l;
    assert_true(fd_vq_get_used(&w->rxq, &id, &l));
    assert_int_equal(id, 0);
    assert_int_equal(l, len);
    uint8_t got[256];
    fd_read(&w->g, gpas[0], got, l);
    assert_memory_equal(got + VN_NET_HDR_LEN, pkt + VN_NET_HDR_LEN, len - VN_NET_HDR_LEN);
    assert_int_equal(stats(w).rx.packets, 1);
}

/* A malformed rx chain goes back with length 0; the frame takes the next. */
static void test_rx_bad_chain(void **state)
{
    struct wfx *w = *state;
    uint64_t ro = FD_GPA_RO;
    uint64_t b0 = fd_alloc(&w->g, 0, 2048, 64);
    uint64_t b1 = fd_alloc(&w->g, 0, 2048, 64);
    /* Device-readable buffer in an rx chain; writable into read-only memory. */
    uint16_t h0 = fd_vq_add(&w->rxq, &(struct fd_buf){ b0, 2048, false }, 1);
    uint16_t h1 = fd_vq_add(&w->rxq, &(struct fd_buf){ ro, 2048, true }, 1);
    uint16_t h2 = fd_vq_add(&w->rxq, &(struct fd_buf){ b1, 2048, true }, 1);
    start(w, 0);
    uint8_t pkt[256];
    size_t len = make_frame(pkt, MAC, 100, 6);
    host_send(w, pkt, len);
    wait_used(&w->rxq, 3);
    uint32_t id, l;
    assert_true(fd_vq_get_used(&w->rxq, &id, &l));
    assert_int_equal(id, h0);
    assert_int_equal(l, 0);
    assert_true(fd_vq_get_used(&w->rxq, &id, &l));
    assert_int_equal(id, h1);
    assert_int_equal(l, 0);
    assert_true(fd_vq_get_used(&w->rxq, &id, &l));
    assert_int_equal(id, h2);
    assert_int_equal(l, len);
    uint8_t got[256];
    fd_read(&w->g, b1, got, l);
    assert_int_equal(vn_le16_get(got + VN_NET_HDR_NUM_BUFFERS_OFF), 1);
    assert_memory_equal(got + VN_NET_HDR_LEN, pkt + VN_NET_HDR_LEN, len - VN_NET_HDR_LEN);
    struct vn_qp_stats s = stats(w);
    assert_int_equal(s.rx.errors[VN_ERR_DESC_ORDER], 1);
    assert_int_equal(s.rx.errors[VN_ERR_DESC_ADDR], 1);
    assert_int_equal(s.rx.packets, 1);
    assert_false(vn_dev_get_needs_reset(w->dev));
}

static void test_tx(void **state)
{
    struct wfx *w = *state;
    start(w, F(VN_F_RING_EVENT_IDX));
    uint8_t pkt[2048], got[2048];
    size_t len = make_frame(pkt, OTHER, 200, 7);
    /* Header and frame in separate buffers, in different regions. */
    uint64_t h = fd_alloc(&w->g, 0, VN_NET_HDR_LEN, 2);
    uint64_t d = fd_alloc(&w->g, 1, len - VN_NET_HDR_LEN, 2);
    fd_write(&w->g, h, pkt, VN_NET_HDR_LEN);
    fd_write(&w->g, d, pkt + VN_NET_HDR_LEN, len - VN_NET_HDR_LEN);
    struct fd_buf b[2] = { { h, VN_NET_HDR_LEN, false }, { d, (uint32_t)(len - VN_NET_HDR_LEN), false } };
    uint16_t old = w->txq.avail_idx;
    uint16_t head = fd_vq_add(&w->txq, b, 2);
    if (fd_vq_kick_needed(&w->txq, true, old))
        vn_dev_doorbell(w->dev, 1);
    assert_int_equal(host_recv(w, got, sizeof(got)), (ssize_t)len);
    assert_memory_equal(got, pkt, len);
    wait_used(&w->txq, 1);
    uint32_t id, l;
    assert_true(fd_vq_get_used(&w->txq, &id, &l));
    assert_int_equal(id, head);
    assert_int_equal(l, 0);
    struct vn_qp_stats s = stats(w);
    assert_int_equal(s.tx.packets, 1);
    assert_int_equal(s.tx.bytes, len - VN_NET_HDR_LEN);
    assert_int_equal(s.tx.doorbells, 1);
}

/* One frame on the tx queue; waits until the device has used it. */
static void send_one_tx(struct wfx *w)
{
    uint8_t pkt[256], got[256];
    size_t len = make_frame(pkt, OTHER, 60, 1);
    uint64_t b = fd_alloc(&w->g, 0, len, 2);
    fd_write(&w->g, b, pkt, len);
    uint16_t old = w->txq.avail_idx;
    fd_vq_add(&w->txq, &(struct fd_buf){ b, (uint32_t)len, false }, 1);
    if (fd_vq_kick_needed(&w->txq, false, old))
        vn_dev_doorbell(w->dev, 1);
    assert_int_equal(host_recv(w, got, sizeof(got)), (ssize_t)len);
    wait_used(&w->txq, 1);
    uint32_t id, l;
    assert_true(fd_vq_get_used(&w->txq, &id, &l));
}

/* NOTF_COAL as the worker applies it: interrupts held back until
 * max_packets packets or max_usecs passed, and released at once when the
 * parameters change so that the conditions are met. */
static void test_tx_coalescing(void **state)
{
    struct wfx *w = *state;
    start(w, 0); /* no EVENT_IDX: without coalescing, one interrupt per packet */
    send_one_tx(w);
    WAIT_FOR(fd_irq_count(TX_VECTOR) == 1);

    vn_dev_set_coal(w->dev, 1, (struct vn_coal_params){ 4, 10 * 1000 * 1000 });
    for (int i = 0; i < 3; i++) {
        send_one_tx(w);
        assert_int_equal(fd_irq_count(TX_VECTOR), 1);
    }
    send_one_tx(w); /* the 4th */
    WAIT_FOR(fd_irq_count(TX_VECTOR) == 2);
    assert_int_equal(stats(w).tx.interrupts_coalesced, 3);

    /* Time first: 200 ms after the packet. */
    vn_dev_set_coal(w->dev, 1, (struct vn_coal_params){ 1000, 200 * 1000 });
    uint64_t t0 = now_ms();
    send_one_tx(w);
    WAIT_FOR(fd_irq_count(TX_VECTOR) == 3);
    assert_true(now_ms() - t0 >= 200);

    /* Held, then coalescing switched off: sent at once. */
    vn_dev_set_coal(w->dev, 1, (struct vn_coal_params){ 1000, 10 * 1000 * 1000 });
    send_one_tx(w);
    assert_int_equal(fd_irq_count(TX_VECTOR), 3);
    vn_dev_set_coal(w->dev, 1, (struct vn_coal_params){ 0, 0 });
    WAIT_FOR(fd_irq_count(TX_VECTOR) == 4);
    assert_int_equal(stats(w).tx.packets, 7);
    assert_int_equal(stats(w).tx.interrupts, 4);
}

/* Malformed and undersized tx chains are dropped, counted and returned. */
static void test_tx_bad_chains(void **state)
{
    struct wfx *w = *state;
    start(w, 0);
    uint64_t b = fd_alloc(&w->g, 0, 4096, 64);
    fd_vq_add(&w->txq, &(struct fd_buf){ b, 100, true }, 1);        /* writable */
    fd_vq_add(&w->txq, &(struct fd_buf){ b, 20, false }, 1);        /* too short */
    fd_vq_add(&w->txq, &(struct fd_buf){ FD_GPA_B - 50, 100, false }, 1); /* straddles */
    vn_dev_doorbell(w->dev, 1);
    wait_used(&w->txq, 3);
    for (int i = 0; i < 3; i++) {
        uint32_t id, l;
        assert_true(fd_vq_get_used(&w->txq, &id, &l));
        assert_int_equal(id, i);
        assert_int_equal(l, 0);
    }
    struct vn_qp_stats s = stats(w);
    assert_int_equal(s.tx.packets, 0);
    assert_int_equal(s.tx.drops[VN_DROP_BAD_CHAIN], 2);
    assert_int_equal(s.tx.drops[VN_DROP_HEADER_TOO_SHORT], 1);
    assert_int_equal(s.tx.errors[VN_ERR_DESC_ORDER], 1);
    assert_int_equal(s.tx.errors[VN_ERR_DESC_ADDR], 1);
    uint8_t got[16];
    assert_int_equal(recv(w->sock[1], got, sizeof(got), MSG_DONTWAIT), -1);
    assert_int_equal(errno, EAGAIN);
    assert_false(vn_dev_get_needs_reset(w->dev));
}

/* A corrupt tx ring: DEVICE_NEEDS_RESET and the config interrupt, once. */
static void test_tx_corrupt_ring(void **state)
{
    struct wfx *w = *state;
    start(w, 0);
    fd_vq_set_avail_idx(&w->txq, QSIZE + 1);
    vn_dev_doorbell(w->dev, 1);
    WAIT_FOR(vn_dev_get_needs_reset(w->dev));
    assert_int_equal(fd_irq_count(CONFIG_VECTOR), 1);
    struct vn_qp_stats s = stats(w);
    fd_assert_errors(&s.tx, VN_ERR_AVAIL_IDX, 1);
    assert_int_equal(fd_vq_used_idx(&w->txq), 0);
    /* Further doorbells are ignored by the broken ring. */
    vn_dev_doorbell(w->dev, 1);
    usleep(20000);
    assert_int_equal(fd_irq_count(CONFIG_VECTOR), 1);
    assert_int_equal(w->dev->st.needs_reset, 1);
}

/* Batched: frames posted 9 at a time (a datagram socket pair, standing in
 * for the TAP, queues at most net.unix.max_dgram_qlen = 10), every fourth
 * too short. The good ones reach the TAP in order and every chain is used,
 * in order. */
static void test_tx_batched_in_order(void **state)
{
    struct wfx *w = *state;
    start(w, 0);
    enum { N = 90, GROUP = 9 };
    uint8_t pkt[256], got[256];
    uint64_t buf = fd_alloc(&w->g, 0, GROUP * sizeof(pkt), 64);
    for (uint32_t g = 0; g < N; g += GROUP) {
        uint16_t old = w->txq.avail_idx;
        for (uint32_t i = g; i < g + GROUP; i++) {
            size_t len = i % 4 == 3 ? 20 : make_frame(pkt, OTHER, 60, (uint8_t)i);
            uint64_t b = buf + (i - g) * sizeof(pkt);
            fd_write(&w->g, b, pkt, len);
            fd_vq_add(&w->txq, &(struct fd_buf){ b, (uint32_t)len, false }, 1);
        }
        if (fd_vq_kick_needed(&w->txq, false, old))
            vn_dev_doorbell(w->dev, 1);
        for (uint32_t i = g; i < g + GROUP; i++) {
            if (i % 4 == 3)
                continue;
            size_t len = make_frame(pkt, OTHER, 60, (uint8_t)i);
            assert_int_equal(host_recv(w, got, sizeof(got)), (ssize_t)len);
            assert_memory_equal(got, pkt, len);
        }
        wait_used(&w->txq, GROUP);
        for (uint32_t i = g; i < g + GROUP; i++) {
            uint32_t id, l;
            assert_true(fd_vq_get_used(&w->txq, &id, &l));
            assert_int_equal(id, i % QSIZE);
        }
    }
    struct vn_qp_stats s = stats(w);
    assert_int_equal(s.tx.packets, N - N / 4);
    assert_int_equal(s.tx.drops[VN_DROP_HEADER_TOO_SHORT], N / 4);
    assert_true(vn_dev_tap_batching(w->dev));
}

/* A transmit doorbell while the worker sleeps: the frame leaves from the
 * doorbell's thread (here the test's), the worker stays asleep, and the
 * next doorbell is asked for (EVENT_IDX: every frame here rang one). */
static void test_tx_inline_while_worker_sleeps(void **state)
{
    struct wfx *w = *state;
    vn_dev_set_tx_inline(w->dev, true);
    start(w, F(VN_F_RING_EVENT_IDX));
    for (int i = 0; i < 5; i++) {
        WAIT_FOR(atomic_load(&w->dev->qp[0].sleeping));
        send_one_tx(w);
    }
    struct vn_dev_stats ds;
    vn_dev_get_dev_stats(w->dev, &ds);
    assert_int_equal(ds.doorbells_inline, 5);
    assert_int_equal(stats(w).tx.packets, 5);
    assert_int_equal(stats(w).tx.doorbells, 5);
}

/* The single-frame transmit tests, batched. */
static void test_tx_batched(void **state)
{
    test_tx(state);
}

static void test_tx_bad_chains_batched(void **state)
{
    test_tx_bad_chains(state);
}

static void test_tx_coalescing_batched(void **state)
{
    test_tx_coalescing(state);
}

/* The ring is locked down: an operation other than WRITEV, or a write to
 * a file other than the registered TAP, is refused by the kernel. */
static void test_tap_batch_restrictions(void **state)
{
    (void)state;
    struct vn_tap_batch *b = calloc(1, sizeof(*b));
    assert_non_null(b);
    assert_int_equal(vn_tap_batch_init(b), 0);
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_DGRAM, 0, sv), 0);
    assert_int_equal(vn_tap_batch_set_fd(b, sv[0]), 0);
    char buf[8] = "abcdefg";
    struct iovec iov = { buf, sizeof(buf) };
    /* A read of the registered file. */
    struct io_uring_sqe *sqe = io_uring_get_sqe(&b->ring);
    io_uring_prep_readv(sqe, 0, &iov, 1, 0);
    sqe->flags |= IOSQE_FIXED_FILE;
    /* A write to a plain descriptor. */
    sqe = io_uring_get_sqe(&b->ring);
    io_uring_prep_writev(sqe, sv[1], &iov, 1, 0);
    /* The kernel stops a submission at the first refused entry. */
    for (int i = 0; i < 2; i++) {
        assert_int_equal(io_uring_submit_and_wait(&b->ring, 1), 1);
        struct io_uring_cqe *cqe;
        assert_int_equal(io_uring_wait_cqe(&b->ring, &cqe), 0);
        assert_int_equal(cqe->res, -EACCES);
        io_uring_cqe_seen(&b->ring, cqe);
    }
    /* What the datapath does works. */
    int32_t res[VN_TAP_BATCH_MAX];
    assert_true(vn_tap_batch_writev(b, &iov, 1, 3));
    assert_int_equal(vn_tap_batch_flush(b, res), 0);
    assert_int_equal(res[3], sizeof(buf));
    assert_int_equal(recv(sv[1], buf, sizeof(buf), MSG_DONTWAIT), sizeof(buf));
    vn_tap_batch_free(b);
    free(b);
    close(sv[0]);
    close(sv[1]);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
#define B(fn) cmocka_unit_test_setup_teardown(fn, setup_batched, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_rx_mergeable),
        T(test_rx_mergeable_short_of_room),
        T(test_rx_buffer_too_small),
        T(test_rx_filter_drop),
        T(test_rx_bad_chain),
        T(test_tx),
        T(test_tx_bad_chains),
        T(test_tx_corrupt_ring),
        T(test_tx_coalescing),
        T(test_tx_inline_while_worker_sleeps),
        B(test_tx_batched),
        B(test_tx_bad_chains_batched),
        B(test_tx_coalescing_batched),
        B(test_tx_batched_in_order),
        cmocka_unit_test(test_tap_batch_restrictions),
    };
    return cmocka_run_group_tests_name("worker", tests, NULL, NULL);
}
