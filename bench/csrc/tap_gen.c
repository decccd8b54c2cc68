/* Traffic source for the device-level benchmark's receive direction: sends
 * Ethernet/IPv4/UDP frames out of a TAP interface (run inside the TAP's
 * network namespace) as fast as it can, so the TAP's queue readers (the
 * device's workers, or the ceiling program) receive them.
 *
 * AF_PACKET socket, PACKET_QDISC_BYPASS (straight to the TAP's transmit
 * routine, which picks the TAP queue by flow hash), sendmmsg batches,
 * several UDP flows (source port varies). Ends after --seconds or on
 * SIGTERM/SIGINT; prints one JSON line on stdout. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "bench_common.h"

#define MAX_BATCH 256
#define MAX_FLOWS 256
#define MAX_THREADS 8

static struct {
    const char *ifname;
    unsigned ifindex;
    size_t frame;
    unsigned flows, batch, threads;
    double seconds;
    uint8_t dst[6], src[6];
    uint8_t (*frames)[BENCH_MAX_FRAME];
} g;

static atomic_bool stop;

struct worker {
    pthread_t thread;
    unsigned id;
    uint64_t sent, calls, errors, enobufs;
    char error[128];
};

static void on_signal(int sig)
{
    (void)sig;
    atomic_store(&stop, true);
}

static void *worker(void *arg)
{
    struct worker *w = arg;
    int s = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: never receives */
    if (s < 0) {
        snprintf(w->error, sizeof(w->error), "socket: %s", strerror(errno));
        return NULL;
    }
    int one = 1;
    if (setsockopt(s, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)) < 0) {
        snprintf(w->error, sizeof(w->error), "PACKET_QDISC_BYPASS: %s", strerror(errno));
        close(s);
        return NULL;
    }
    struct sockaddr_ll to = {
        .sll_family = AF_PACKET,
        .sll_protocol = htons(ETH_P_IP), /* skb->protocol: lets the TAP hash flows */
        .sll_ifindex = (int)g.ifindex,
        .sll_halen = 6,
    };
    memcpy(to.sll_addr, g.dst, 6);
    static __thread struct mmsghdr msgs[MAX_BATCH];
    static __thread struct iovec iov[MAX_BATCH];
    unsigned flow = w->id;
    double end = now_s() + g.seconds;
    unsigned n = 0;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        if ((n++ & 63) == 0 && now_s() >= end)
            break;
        for (unsigned i = 0; i < g.batch; i++) {
            iov[i].iov_base = g.frames[flow];
            iov[i].iov_len = g.frame;
            flow = (flow + 1) % g.flows;
            msgs[i].msg_hdr = (struct msghdr){
                .msg_name = &to,
                .msg_namelen = sizeof(to),
                .msg_iov = &iov[i],
                .msg_iovlen = 1,
            };
        }
        int r = sendmmsg(s, msgs, g.batch, 0);
        w->calls++;
        if (r > 0) {
            w->sent += (uint64_t)r;
            continue;
        }
        if (r < 0 && (errno == ENOBUFS || errno == EAGAIN)) {
            w->enobufs++;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        w->errors++;
        if (r < 0 && errno == ENETDOWN) {
            usleep(1000);
            continue;
        }
        if (w->errors > 1000) {
            snprintf(w->error, sizeof(w->error), "sendmmsg: %s", strerror(errno));
            break;
        }
    }
    close(s);
    return NULL;
}

static void usage(void)
{
    die("usage: tap_gen --ifname IF --frame-bytes N --seconds S --dst-mac M --src-mac M "
        "[--flows N] [--batch N] [--threads N]");
}

int main(int argc, char **argv)
{
    g.flows = 16;
    g.batch = 64;
    g.threads = 1;
    g.seconds = 10;
    bool have_dst = false, have_src = false;
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(k, "--ifname"))
            g.ifname = v;
        else if (!strcmp(k, "--frame-bytes"))
            g.frame = check_frame_bytes(parse_u64(v, k));
        else if (!strcmp(k, "--seconds"))
            g.seconds = parse_double(v, k);
        else if (!strcmp(k, "--flows"))
            g.flows = (unsigned)parse_u64(v, k);
        else if (!strcmp(k, "--batch"))
            g.batch = (unsigned)parse_u64(v, k);
        else if (!strcmp(k, "--threads"))
            g.threads = (unsigned)parse_u64(v, k);
        else if (!strcmp(k, "--dst-mac"))
            parse_mac(v, g.dst), have_dst = true;
        else if (!strcmp(k, "--src-mac"))
            parse_mac(v, g.src), have_src = true;
        else
            usage();
    }
    if (g.ifname == NULL || g.frame == 0 || !have_dst || !have_src || g.flows == 0 ||
        g.flows > MAX_FLOWS || g.batch == 0 || g.batch > MAX_BATCH || g.threads == 0 ||
        g.threads > MAX_THREADS)
        usage();
    g.ifindex = if_nametoindex(g.ifname);
    if (g.ifindex == 0) {
        fprintf(stderr, "no interface %s\n", g.ifname);
        return 2;
    }
    g.frames = calloc(g.flows, sizeof(*g.frames));
    if (g.frames == NULL)
        die("out of memory");
    for (unsigned f = 0; f < g.flows; f++)
        build_frame(g.frames[f], g.frame, g.dst, g.src, f);

    struct sigaction sa = { .sa_handler = on_signal };
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    struct worker w[MAX_THREADS] = { 0 };
    double t0 = now_s();
    for (unsigned i = 0; i < g.threads; i++) {
        w[i].id = i;
        if (pthread_create(&w[i].thread, NULL, worker, &w[i]) != 0)
            die("pthread_create");
    }
    uint64_t sent = 0, calls = 0, errors = 0, enobufs = 0;
    const char *error = "";
    for (unsigned i = 0; i < g.threads; i++) {
        pthread_join(w[i].thread, NULL);
        sent += w[i].sent;
        calls += w[i].calls;
        errors += w[i].errors;
        enobufs += w[i].enobufs;
        if (w[i].error[0] != '\0')
            error = w[i].error;
    }
    double secs = now_s() - t0;
    printf("{\"sent\": %llu, \"calls\": %llu, \"errors\": %llu, \"enobufs\": %llu, "
           "\"seconds\": %.6f, \"pps\": %.1f, \"error\": \"%s\"}\n",
           (unsigned long long)sent, (unsigned long long)calls, (unsigned long long)errors,
           (unsigned long long)enobufs, secs, secs > 0 ? (double)sent / secs : 0.0, error);
    fflush(stdout);
    return error[0] != '\0' ? 1 : 0;
}
