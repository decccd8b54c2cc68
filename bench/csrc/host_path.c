/* The ceiling of the host path alone, for the device-level benchmark: the
 * same TAP the device would use, opened the way the daemon opens it
 * (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, + IFF_MULTI_QUEUE with more than one
 * queue, 12-byte vnet header, no offloads, non-blocking), one queue and one
 * thread per pair, and the same system calls per frame as the device's
 * workers, with no guest rings in between:
 *
 *  tx  writev(12-byte vnet header, frame) in a loop (frames as the
 *      synthetic driver builds them, several flows);
 *  rx  readv into a 2 KiB buffer (header + frame) in a loop, poll() when the
 *      queue is empty; the traffic comes from tap_gen.
 *
 * Timeline: warm-up, measured window. Prints one JSON line on stdout. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include "bench_common.h"

#define MAX_QUEUES 16
#define RX_BUF 2048

static struct {
    const char *tap;
    unsigned queues, flows;
    int rx;
    size_t frame;
    double warmup, seconds, t_start;
    uint8_t dst[6], src[6];
} g;

struct counters {
    uint64_t packets, bytes, errors, polls;
};

struct worker {
    pthread_t thread;
    unsigned id;
    int fd;
    struct counters c, w0, w1;
    double t0, t1;
};

static int open_queue(void)
{
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        perror("/dev/net/tun");
        exit(2);
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", g.tap);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (g.queues > 1 ? IFF_MULTI_QUEUE : 0);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        fprintf(stderr, "TUNSETIFF %s: %s\n", g.tap, strerror(errno));
        exit(2);
    }
    int hdr = BENCH_VNET_HDR_LEN;
    if (ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0) {
        fprintf(stderr, "TUNSETVNETHDRSZ: %s\n", strerror(errno));
        exit(2);
    }
    if (ioctl(fd, TUNSETOFFLOAD, 0) < 0) {
        fprintf(stderr, "TUNSETOFFLOAD: %s\n", strerror(errno));
        exit(2);
    }
    return fd;
}

/* Window bookkeeping; returns false once the window is over. */
static bool tick(struct worker *w)
{
    double t = now_s();
    double a = g.t_start + g.warmup, b = a + g.seconds;
    if (w->t0 == 0 && t >= a) {
        w->w0 = w->c;
        w->t0 = t;
    }
    if (t >= b) {
        w->w1 = w->c;
        w->t1 = t;
        return false;
    }
    return true;
}

static void *tx_worker(void *arg)
{
    struct worker *w = arg;
    static __thread uint8_t frames[16][BENCH_MAX_FRAME];
    unsigned nf = g.flows < 16 ? g.flows : 16;
    for (unsigned f = 0; f < nf; f++)
        build_frame(frames[f], g.frame, g.dst, g.src, (w->id * nf + f) % g.flows);
    uint8_t hdr[BENCH_VNET_HDR_LEN] = { 0 };
    struct iovec iov[2] = { { hdr, sizeof(hdr) }, { NULL, g.frame } };
    unsigned f = 0, n = 0;
    for (;;) {
        if ((n++ & 255) == 0 && !tick(w))
            break;
        iov[1].iov_base = frames[f];
        f = (f + 1) % nf;
        ssize_t r = writev(w->fd, iov, 2);
        if (r < 0) {
            if (errno == EAGAIN) {
                struct pollfd pfd = { .fd = w->fd, .events = POLLOUT };
                w->c.polls++;
                poll(&pfd, 1, 10);
            } else {
                w->c.errors++;
            }
            continue;
        }
        w->c.packets++;
        w->c.bytes += g.frame;
    }
    return NULL;
}

static void *rx_worker(void *arg)
{
    struct worker *w = arg;
    static __thread uint8_t buf[RX_BUF];
    struct iovec iov = { buf, sizeof(buf) };
    unsigned n = 0;
    for (;;) {
        if ((n++ & 255) == 0 && !tick(w))
            break;
        ssize_t r = readv(w->fd, &iov, 1);
        if (r < 0) {
            if (errno == EAGAIN) {
                if (!tick(w))
                    break;
                struct pollfd pfd = { .fd = w->fd, .events = POLLIN };
                w->c.polls++;
                poll(&pfd, 1, 10);
            } else {
                w->c.errors++;
            }
            continue;
        }
        if (r < BENCH_VNET_HDR_LEN + 14) {
            w->c.errors++;
            continue;
        }
        w->c.packets++;
        w->c.bytes += (uint64_t)r - BENCH_VNET_HDR_LEN;
    }
    return NULL;
}

static void usage(void)
{
    die("usage: host_path --tap IF --queues N --direction tx|rx --frame-bytes N --seconds S "
        "[--warmup S] [--flows N] [--dst-mac M --src-mac M]");
}

int main(int argc, char **argv)
{
    const char *dir = NULL;
    g.queues = 1;
    g.flows = 16;
    g.warmup = 0.5;
    g.seconds = 5;
    bool have_dst = false, have_src = false;
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(k, "--tap"))
            g.tap = v;
        else if (!strcmp(k, "--queues"))
            g.queues = (unsigned)parse_u64(v, k);
        else if (!strcmp(k, "--direction"))
            dir = v;
        else if (!strcmp(k, "--frame-bytes"))
            g.frame = check_frame_bytes(parse_u64(v, k));
        else if (!strcmp(k, "--seconds"))
            g.seconds = parse_double(v, k);
        else if (!strcmp(k, "--warmup"))
            g.warmup = parse_double(v, k);
        else if (!strcmp(k, "--flows"))
            g.flows = (unsigned)parse_u64(v, k);
        else if (!strcmp(k, "--dst-mac"))
            parse_mac(v, g.dst), have_dst = true;
        else if (!strcmp(k, "--src-mac"))
            parse_mac(v, g.src), have_src = true;
        else
            usage();
    }
    if (g.tap == NULL || dir == NULL || g.frame == 0 || g.queues == 0 ||
        g.queues > MAX_QUEUES || g.flows == 0)
        usage();
    if (!strcmp(dir, "tx"))
        g.rx = 0;
    else if (!strcmp(dir, "rx"))
        g.rx = 1;
    else
        usage();
    if (!g.rx && (!have_dst || !have_src))
        die("tx needs --dst-mac and --src-mac");

    struct worker w[MAX_QUEUES];
    memset(w, 0, sizeof(w));
    for (unsigned i = 0; i < g.queues; i++) {
        w[i].id = i;
        w[i].fd = open_queue();
    }
    g.t_start = now_s();
    for (unsigned i = 0; i < g.queues; i++)
        if (pthread_create(&w[i].thread, NULL, g.rx ? rx_worker : tx_worker, &w[i]) != 0)
            die("pthread_create");
    double pps = 0, span = 0;
    uint64_t packets = 0, bytes = 0, errors = 0, polls = 0;
    printf("{\"direction\": \"%s\", \"frame_bytes\": %zu, \"queues\": %u, \"per_queue\": [", dir,
           g.frame, g.queues);
    for (unsigned i = 0; i < g.queues; i++) {
        pthread_join(w[i].thread, NULL);
        if (w[i].t0 == 0) {
            w[i].t0 = w[i].t1;
            w[i].w0 = w[i].w1;
        }
        double secs = w[i].t1 - w[i].t0;
        uint64_t p = w[i].w1.packets - w[i].w0.packets;
        uint64_t b = w[i].w1.bytes - w[i].w0.bytes;
        packets += p;
        bytes += b;
        errors += w[i].c.errors;
        polls += w[i].w1.polls - w[i].w0.polls;
        if (secs > 0)
            pps += (double)p / secs;
        span += secs / g.queues;
        printf("{\"queue\": %u, \"seconds\": %.6f, \"packets\": %llu}%s", i, secs,
               (unsigned long long)p, i + 1 < g.queues ? ", " : "");
        close(w[i].fd);
    }
    printf("], \"seconds\": %.6f, \"pps\": %.1f, \"packets\": %llu, \"bytes\": %llu, "
           "\"errors\": %llu, \"polls\": %llu}\n",
           span, pps, (unsigned long long)packets, (unsigned long long)bytes,
           (unsigned long long)errors, (unsigned long long)polls);
    fflush(stdout);
    return 0;
}
