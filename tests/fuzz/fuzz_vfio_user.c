/* libFuzzer target: vfio-user messages from a hostile client, into a real
 * libvfio-user context (its lib sources built here with the same
 * instrumentation) set up by the device's own server.c callbacks on a
 * vn_dev from device.c.
 *
 * Each input gets a fresh device and context listening on a unix socket in a
 * private directory; the fuzzer connects as the client, sends the input's
 * messages one at a time (header, payload, SCM_RIGHTS fds), and after each
 * one runs vfu_run_ctx() until the server has read everything it was sent,
 * reading the replies as it goes. Then it disconnects, lets the context see
 * it, destroys everything and checks that nothing was left behind.
 *
 * Input (little endian; past the end every field reads as zero):
 *   u8   setup    bits 0-1 queue pairs - 1, bit 2 doorbell polling mode
 *                 (BAR0's notify area is a sparse mmap backed by a memfd)
 *   then the VERSION negotiation (an op without its op byte, see VERSION),
 *   then ops to the end, each an op byte:
 *     low 4 bits: the command (0 and 15: raw), high 4 bits: the message's
 *     header "lies" (see struct msg_mods); then the command's fields (see
 *     build_*) and fds (see attach_fds)
 *   op byte 0xF0: disconnect, then connect and negotiate again
 *   op byte 0xF1: u8 k, u8 pages: truncate the client's k-th memfd (after
 *                 the server may have mapped it)
 *
 * Invariants, checked after every message:
 *   - every region in the device's guest memory (dev->mem) lies in shared
 *     mappings of one of the client's memfds (/proc/self/maps), readable,
 *     writable when the device may write it; it is one the client asked to
 *     map (same address and length, with read access and, when the device
 *     writes it, write access), and its bytes are that file's at the
 *     requested offset (each memfd holds a pattern of its offsets; pages of
 *     it are read and written back);
 *   - heap in use stays under FZ_HEAP_LIMIT more than at the start;
 *   - replies are well formed, answer a message that was sent and carry at
 *     most the fds the protocol allows (closed here).
 * After the disconnect: the device's guest memory is empty, the process has
 * exactly the fds it had before the client connected, and no mapping of a
 * client memfd remains; after teardown, the fds and heap of before the
 * input. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <poll.h>
#include <pthread.h>
#include <sanitizer/allocator_interface.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

#include "device.h"
#include "fuzz_common.h"
#include "irq.h"
#include "layout.h"
#include "libvfio-user.h"
#include "server.h"
#include "vfio-user.h"

#define PAGE 4096ull
#define MAX_MEMFDS 16
#define MAX_SENT 256
#define MAX_BODY (64 * 1024)
#define MAX_MSG_FDS 4
#define FZ_HEAP_LIMIT (64ull << 20)
/* Leftovers of a lying header can be parsed as more messages; each round
 * consumes at least a header or ends the connection. */
#define MAX_ROUNDS 64

/* -- the client's files ---------------------------------------------------------- */

struct memfd_rec {
    int fd;
    ino_t ino;
    dev_t dev;
    uint64_t size;   /* now */
    bool shrunk;     /* by the client, after it was sent */
    uint8_t id;
};

/* What each memfd holds at file offset off: distinct within a page and
 * between memfds, so a mapping of the wrong offset or file shows. */
static uint8_t pattern(uint8_t id, uint64_t off)
{
    return (uint8_t)(off ^ (off >> 8) ^ (off >> 16) ^ (id * 0x5bu));
}

/* A DMA_MAP as sent, and how the server answered it. */
struct sent_map {
    uint16_t msg_id;
    uint64_t addr, size, offset;
    uint32_t flags;
    int memfd;      /* index in h.mf, or -1 */
    int status;     /* 0 no answer yet (or none asked), 1 ok, -1 refused */
};

struct harness {
    char dir[64];
    char path[108];
    struct vn_dev *dev;
    vfu_ctx_t *ctx;
    int listen_fd;
    int client;
    bool attached;
    bool lied;      /* a message on this connection was not what it said */
    bool any_shrunk;
    uint16_t next_id;
    struct memfd_rec mf[MAX_MEMFDS];
    unsigned nmf;
    struct sent_map maps[MAX_SENT];
    unsigned nmaps;
    /* Per sent message id: its command, or -1 once answered. */
    int16_t pending[65536];
    uint64_t mem_gen;
    bool mem_dirty;
    size_t heap0;
    uint8_t bar0[VN_BAR0_SIZE];
};

static struct harness h;
static uint8_t body[MAX_BODY + 64];

/* -- process state ------------------------------------------------------------------- */

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    FZ_CHECK(d != NULL, "opendir /proc/self/fd: %s", strerror(errno));
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the directory's own fd */
}

/* For a failed fd count: what is open. */
static void dump_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    while (d != NULL && (e = readdir(d)) != NULL) {
        char p[64], t[256];
        snprintf(p, sizeof(p), "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(p, t, sizeof(t) - 1);
        t[n < 0 ? 0 : n] = 0;
        fprintf(stderr, "  fd %s -> %s\n", e->d_name, t);
    }
    if (d != NULL)
        closedir(d);
}

struct map_entry {
    uintptr_t start, end;
    char perms[5];
    uint64_t off;
    unsigned maj, min;
    unsigned long ino;
};

#define MAX_MAPS 8192
static struct map_entry maps[MAX_MAPS];
static char maps_buf[1 << 20];

static unsigned read_maps(void)
{
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    FZ_CHECK(fd >= 0, "open /proc/self/maps: %s", strerror(errno));
    size_t len = 0;
    ssize_t r;
    while ((r = read(fd, maps_buf + len, sizeof(maps_buf) - 1 - len)) > 0)
        len += (size_t)r;
    close(fd);
    maps_buf[len] = 0;
    unsigned n = 0;
    for (char *line = maps_buf; line != NULL && *line && n < MAX_MAPS;) {
        char *nl = strchr(line, '\n');
        if (nl != NULL)
            *nl = 0;
        struct map_entry *m = &maps[n];
        unsigned long s, e;
        unsigned long long off;
        if (sscanf(line, "%lx-%lx %4s %llx %x:%x %lu", &s, &e, m->perms, &off, &m->maj, &m->min,
                   &m->ino) == 7) {
            m->start = s;
            m->end = e;
            m->off = off;
            n++;
        }
        line = nl != NULL ? nl + 1 : NULL;
    }
    return n;
}

static struct memfd_rec *memfd_of_ino(unsigned long ino)
{
    for (unsigned i = 0; i < h.nmf; i++)
        if (h.mf[i].fd >= 0 && (unsigned long)h.mf[i].ino == ino)
            return &h.mf[i];
    return NULL;
}

/* The device's guest memory, region by region, against /proc/self/maps and
 * what the client sent (see the invariants at the top). */
static void check_guest_mem(void)
{
    struct vn_mem *mem = &h.dev->mem;
    if (!h.mem_dirty && mem->generation == h.mem_gen)
        return;
    h.mem_dirty = false;
    h.mem_gen = mem->generation;
    if (mem->n == 0)
        return;
    unsigned nm = read_maps();
    for (unsigned i = 0; i < mem->n; i++) {
        const struct vn_mem_region *r = &mem->r[i];
        FZ_CHECK(r->len > 0, "region %u empty", i);
        /* Mapped, all of it, from one of the client's memfds, with the
         * access the device assumes. */
        uintptr_t at = (uintptr_t)r->hva, end = (uintptr_t)r->hva + r->len;
        FZ_CHECK(end > at, "region %u wraps", i);
        const struct memfd_rec *f = NULL;
        uint64_t map_off = 0;
        while (at < end) {
            const struct map_entry *m = NULL;
            for (unsigned k = 0; k < nm; k++)
                if (maps[k].start <= at && at < maps[k].end) {
                    m = &maps[k];
                    break;
                }
            FZ_CHECK(m != NULL, "guest region 0x%llx: host 0x%lx not mapped",
                     (unsigned long long)r->gpa, (unsigned long)at);
            FZ_CHECK(m->perms[0] == 'r' && (!r->writable || m->perms[1] == 'w'),
                     "guest region 0x%llx (%s): host 0x%lx mapped %s",
                     (unsigned long long)r->gpa, r->writable ? "rw" : "ro", (unsigned long)at,
                     m->perms);
            /* mem_guard.c's zeros over pages a shrunk file lost. */
            if (m->ino == 0 && m->perms[3] == 'p' && h.any_shrunk) {
                at = m->end;
                continue;
            }
            FZ_CHECK(m->perms[3] == 's', "guest region 0x%llx: host 0x%lx mapped %s",
                     (unsigned long long)r->gpa, (unsigned long)at, m->perms);
            const struct memfd_rec *mf = memfd_of_ino(m->ino);
            FZ_CHECK(mf != NULL, "guest region 0x%llx: host 0x%lx maps inode %lu, no client memfd",
                     (unsigned long long)r->gpa, (unsigned long)at, m->ino);
            FZ_CHECK(f == NULL || f == mf, "guest region 0x%llx spans two files",
                     (unsigned long long)r->gpa);
            if (f == NULL)
                map_off = m->off + ((uintptr_t)r->hva - m->start);
            f = mf;
            at = m->end;
        }
        if (f == NULL)
            continue; /* all of it lost and replaced */
        /* One of the client's maps of that file at that offset, readable,
         * and writable when the device writes. */
        const struct sent_map *want = NULL;
        for (unsigned k = 0; k < h.nmaps; k++) {
            const struct sent_map *s = &h.maps[k];
            if (s->status >= 0 && s->addr == r->gpa && s->size == r->len && s->memfd >= 0 &&
                h.mf[s->memfd].ino == f->ino && s->offset == map_off &&
                (s->flags & VFIO_USER_F_DMA_REGION_READ) &&
                (!r->writable || (s->flags & VFIO_USER_F_DMA_REGION_WRITE)))
                want = s;
        }
        FZ_CHECK(want != NULL,
                 "guest region 0x%llx+0x%llx (%s, file offset 0x%llx) is no readable DMA_MAP "
                 "the client sent",
                 (unsigned long long)r->gpa, (unsigned long long)r->len,
                 r->writable ? "rw" : "ro", (unsigned long long)map_off);
        /* Its bytes are the file's at the client's offset: the first, the
         * last and one per page (up to 256), read and written back as the
         * datapath would. A file the client shrank after sending it has no
         * bytes past its new end: there the access faults and mem_guard.c
         * puts zeros in their place. */
        uint64_t step = r->len / 256 > PAGE ? r->len / 256 : PAGE;
        for (uint64_t o = 0;; o += step) {
            if (o >= r->len)
                o = r->len - 1;
            uint64_t foff = want->offset + o;
            if (foff < f->size) {
                volatile uint8_t *p = r->hva + o;
                uint8_t v = *p;
                FZ_CHECK(v == pattern(f->id, foff),
                         "guest 0x%llx (host %p) reads 0x%02x, file offset 0x%llx holds 0x%02x",
                         (unsigned long long)(r->gpa + o), (void *)p, v,
                         (unsigned long long)foff, pattern(f->id, foff));
                if (r->writable)
                    *p = v;
            } else {
                FZ_CHECK(f->shrunk, "guest 0x%llx is past the end of its file (0x%llx)",
                         (unsigned long long)(r->gpa + o), (unsigned long long)f->size);
                volatile uint8_t *p = r->hva + o;
                uint8_t v = *p;
                FZ_CHECK(v == 0, "guest 0x%llx past its shrunk file reads 0x%02x, not zero",
                         (unsigned long long)(r->gpa + o), v);
                if (r->writable)
                    *p = v;
            }
            if (o == r->len - 1)
                break;
        }
    }
}

static void check_heap(void)
{
    size_t now = __sanitizer_get_current_allocated_bytes();
    FZ_CHECK(now < h.heap0 || now - h.heap0 < FZ_HEAP_LIMIT, "heap grew by %zu bytes",
             now - h.heap0);
}

/* -- the client side of the socket ------------------------------------------------- */

static uint8_t reply_buf[2 << 20];
static size_t reply_have;

/* Read every reply there is; close the fds that come with them. */
static void drain(void)
{
    if (h.client < 0)
        return;
    for (;;) {
        union {
            char b[CMSG_SPACE(64 * sizeof(int))];
            struct cmsghdr align;
        } ctl;
        struct iovec iov = { .iov_base = reply_buf + reply_have, .iov_len = sizeof(reply_buf) - reply_have };
        struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
                            .msg_controllen = sizeof(ctl.b) };
        ssize_t n = recvmsg(h.client, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n <= 0)
            break;
        int nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c != NULL; c = CMSG_NXTHDR(&m, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int i = 0; i < k; i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                    close(fd);
                }
                nfds += k;
            }
        }
        FZ_CHECK(!(m.msg_flags & MSG_CTRUNC), "reply with more than 64 fds");
        reply_have += (size_t)n;
        /* Parse whole replies; a reply bigger than the buffer is only
         * checked for its header. */
        size_t at = 0;
        while (reply_have - at >= sizeof(struct vfio_user_header)) {
            struct vfio_user_header hd;
            memcpy(&hd, reply_buf + at, sizeof(hd));
            FZ_CHECK(hd.flags.type == VFIO_USER_F_TYPE_REPLY, "message type %u from the server",
                     hd.flags.type);
            FZ_CHECK(hd.msg_size >= sizeof(hd), "reply of %u bytes", hd.msg_size);
            /* After a lie, the server may read leftovers as a header and
             * answer whatever id and command they hold. */
            FZ_CHECK(h.lied || h.pending[hd.msg_id] == (int16_t)hd.cmd,
                     "reply to msg %#x cmd %u: %s", hd.msg_id, hd.cmd,
                     h.pending[hd.msg_id] < 0 ? "nothing pending" : "another command");
            h.pending[hd.msg_id] = -1;
            if (hd.cmd == VFIO_USER_DMA_MAP)
                for (unsigned k = 0; k < h.nmaps; k++)
                    if (h.maps[k].msg_id == hd.msg_id && h.maps[k].status == 0)
                        h.maps[k].status = hd.flags.error ? -1 : 1;
            if (hd.cmd != VFIO_USER_DEVICE_GET_REGION_INFO &&
                hd.cmd != VFIO_USER_DEVICE_GET_REGION_IO_FDS)
                FZ_CHECK(nfds == 0, "cmd %u replied with %d fds", hd.cmd, nfds);
            nfds = 0;
            FZ_CHECK(hd.msg_size <= sizeof(reply_buf), "reply of %u bytes", hd.msg_size);
            if (reply_have - at < hd.msg_size)
                break;
            at += hd.msg_size;
        }
        memmove(reply_buf, reply_buf + at, reply_have - at);
        reply_have -= at;
    }
}

/* One vfu_run_ctx() as server.c's loop runs it. */
static int run_once(void)
{
    pthread_rwlock_wrlock(&h.dev->irq_lock);
    int r = vfu_run_ctx(h.ctx);
    int err = errno;
    pthread_rwlock_unlock(&h.dev->irq_lock);
    vn_dev_resume_workers(h.dev);
    vn_irq_flush_pending(h.dev);
    errno = err;
    if (vfu_get_poll_fd(h.ctx) == h.listen_fd)
        h.attached = false;
    return r;
}

/* Let the server read all it has been sent (or drop the connection). */
static void serve(void)
{
    for (int i = 0; i < MAX_ROUNDS && h.attached; i++) {
        int pending = 0;
        if (ioctl(vfu_get_poll_fd(h.ctx), FIONREAD, &pending) < 0 || pending == 0) {
            /* A closed client: one more run sees the end of the stream. */
            struct pollfd p = { .fd = vfu_get_poll_fd(h.ctx), .events = POLLIN };
            if (poll(&p, 1, 0) <= 0 || !(p.revents & (POLLIN | POLLHUP)))
                break;
        }
        run_once();
        drain();
        check_guest_mem();
        check_heap();
    }
    drain();
}

static void memfds_close(void)
{
    for (unsigned i = 0; i < h.nmf; i++)
        if (h.mf[i].fd >= 0)
            close(h.mf[i].fd);
    h.nmf = 0;
}

static int new_memfd(struct fz_in *in)
{
    uint8_t b = fz_u8(in);
    if (h.nmf == MAX_MEMFDS)
        return -1;
    /* Sizes from nothing to 32 pages, some not page multiples. */
    uint64_t size = (uint64_t)(b & 0x1f) * PAGE + ((b & 0x20) ? (uint64_t)fz_u16(in) % PAGE : 0);
    int fd = memfd_create("vfz", MFD_CLOEXEC);
    FZ_CHECK(fd >= 0, "memfd_create: %s", strerror(errno));
    struct memfd_rec *m = &h.mf[h.nmf];
    m->id = (uint8_t)(h.nmf * 37 + 11);
    static uint8_t buf[32 * PAGE + PAGE];
    for (uint64_t o = 0; o < size; o++)
        buf[o] = pattern(m->id, o);
    FZ_CHECK(pwrite(fd, buf, size, 0) == (ssize_t)size, "pwrite memfd");
    if (b & 0x40) /* sealed against shrinking, as QEMU's memory-backend-memfd */
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK);
    struct stat st;
    fstat(fd, &st);
    m->fd = fd;
    m->ino = st.st_ino;
    m->dev = st.st_dev;
    m->size = size;
    m->shrunk = false;
    return (int)h.nmf++;
}

/* Up to MAX_MSG_FDS fds for a message, from one byte per fd until a zero
 * kind: 1-3 a new memfd, 4 an eventfd, 5 /dev/null, 6 the first memfd again,
 * 7 a pipe's read end, else stop. Returns how many; *first_memfd is the
 * memfd index of the first fd (the one a DMA_MAP uses) or -1. The caller
 * closes the fds it owns (own[i]) after sending. */
static int attach_fds(struct fz_in *in, unsigned want, int *fds, bool *own, int *first_memfd)
{
    int n = 0;
    *first_memfd = -1;
    for (unsigned i = 0; i < want && i < MAX_MSG_FDS; i++) {
        uint8_t kind = fz_u8(in) & 7;
        int fd = -1, mi = -1;
        own[n] = true;
        switch (kind) {
        case 1: case 2: case 3:
            mi = new_memfd(in);
            if (mi >= 0) {
                fd = h.mf[mi].fd;
                own[n] = false;
            }
            break;
        case 4:
            fd = eventfd(0, EFD_CLOEXEC);
            break;
        case 5:
            fd = open("/dev/null", O_RDWR | O_CLOEXEC);
            break;
        case 6:
            if (h.nmf > 0) {
                mi = 0;
                fd = h.mf[0].fd;
                own[n] = false;
            }
            break;
        case 7: {
            int p[2];
            if (pipe2(p, O_CLOEXEC) == 0) {
                close(p[1]);
                fd = p[0];
            }
            break;
        }
        default:
            break;
        }
        if (fd < 0)
            break;
        if (mi >= 0 && n == 0)
            *first_memfd = mi;
        fds[n++] = fd;
    }
    return n;
}

/* Header "lies" (the op byte's high nibble for commands): */
#define MOD_NO_REPLY 0x1   /* flags.no_reply */
#define MOD_NOT_CMD 0x2    /* type REPLY (or bad type) and the error bit */
#define MOD_SIZE 0x4       /* msg_size off by a signed byte from the input */
#define MOD_CUT 0x8        /* the body cut short, then disconnect */

static void send_msg(uint16_t cmd, unsigned mods, struct fz_in *in, size_t len, const int *fds,
                     int nfds)
{
    struct vfio_user_header hd = { .msg_id = h.next_id++, .cmd = cmd };
    hd.msg_size = (uint32_t)(sizeof(hd) + len);
    hd.flags.type = VFIO_USER_F_TYPE_COMMAND;
    if (mods & MOD_NO_REPLY)
        hd.flags.no_reply = 1;
    if (mods & MOD_NOT_CMD) {
        uint8_t b = fz_u8(in);
        hd.flags.type = b & 0xf;
        hd.flags.error = (b >> 4) & 1;
        hd.error_no = b >> 5;
    }
    if (mods & MOD_SIZE)
        hd.msg_size += (uint32_t)(int32_t)(int8_t)fz_u8(in) * ((mods & MOD_CUT) ? 1 : 4);
    size_t send_len = len;
    if (mods & MOD_CUT)
        send_len = len == 0 ? 0 : fz_u16(in) % len;
    /* Expect a reply when the server will read this as a whole command. */
    bool whole = hd.flags.type == VFIO_USER_F_TYPE_COMMAND && hd.msg_size == sizeof(hd) + len &&
                 send_len == len;
    /* A no_reply command is answered all the same when it fails early
     * (a bad header). */
    h.pending[hd.msg_id] = (int16_t)cmd;
    if (!whole)
        h.lied = true;
    struct iovec iov[2] = { { &hd, sizeof(hd) }, { body, send_len } };
    union {
        char b[CMSG_SPACE(MAX_MSG_FDS * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = send_len ? 2 : 1 };
    if (nfds > 0) {
        memset(&ctl, 0, sizeof(ctl));
        m.msg_control = ctl.b;
        m.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }
    ssize_t n = sendmsg(h.client, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET || errno == EAGAIN))
        return;
    FZ_CHECK(n == (ssize_t)(sizeof(hd) + send_len), "sendmsg: %zd: %s", n, strerror(errno));
    /* A body cut short is the last thing on this connection: the server
     * then sees the end of the stream instead of waiting for the rest. */
    if (mods & MOD_CUT)
        shutdown(h.client, SHUT_WR);
}

/* -- messages ------------------------------------------------------------------------ */

static void put32(size_t off, uint32_t v) { memcpy(body + off, &v, 4); }
static void put64(size_t off, uint64_t v) { memcpy(body + off, &v, 8); }

/* argsz: the right one mostly, else anything up to twice as large. */
static uint32_t argsz(struct fz_in *in, uint32_t right)
{
    uint8_t b = fz_u8(in);
    if (b < 0xc0)
        return right;
    return b == 0xff ? fz_u32(in) : (uint32_t)(b - 0xc0) * 2 * right / 0x3f;
}

/* Guest addresses and sizes: page-sized steps mostly, with an unaligned
 * tail or a huge value now and then. */
static uint64_t addr_field(struct fz_in *in)
{
    uint8_t b = fz_u8(in);
    uint64_t v = (uint64_t)(b & 0x3f) * PAGE;
    if (b & 0x40)
        v += fz_u16(in) % PAGE;
    if (b & 0x80)
        v = (uint64_t)fz_u32(in) << 32 | fz_u32(in);
    return v;
}

static const char *const version_json[] = {
    "",
    "{}",
    "{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576}}",
    "{\"capabilities\":{\"max_msg_fds\":-1}}",
    "{\"capabilities\":{\"max_msg_fds\":100000}}",
    "{\"capabilities\":{\"max_data_xfer_size\":0}}",
    "{\"capabilities\":{\"migration\":{\"pgsize\":4096}}}",
    "{\"capabilities\":{\"migration\":7}}",
    "{\"capabilities\":[1,2]}",
    "{\"capabilities\":{\"max_msg_fds\":\"8\"}}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "{\"capabilities\":",
    "{\"capabilities\":{\"max_msg_fds\":1,\"max_msg_fds\":2}}",
    "{\"capabilities\":{\"max_data_xfer_size\":9223372036854775807}}",
    "\"\\ud800\"",
    "{\"a\":1e999999}",
};

/* VERSION: u8 variant (bits 0-3 the JSON, bit 4 no NUL at its end, bit 5
 * major from the input, bit 6 fds with it), then the mods. */
static size_t build_version(struct fz_in *in, uint8_t *nfds_wanted)
{
    uint8_t v = fz_u8(in);
    const char *js = version_json[v & 0xf];
    uint16_t major = (v & 0x20) ? fz_u16(in) : LIB_VFIO_USER_MAJOR;
    uint16_t minor = fz_u16(in);
    memcpy(body, &major, 2);
    memcpy(body + 2, &minor, 2);
    size_t n = strlen(js);
    memcpy(body + 4, js, n);
    size_t len = 4 + n;
    if (n > 0 && !(v & 0x10))
        body[len++] = 0;
    *nfds_wanted = (v & 0x40) ? 1 : 0;
    return len;
}

static size_t build_dma_map(struct fz_in *in, struct sent_map *rec)
{
    uint8_t f = fz_u8(in);
    /* Mostly read, read-write, write-only or none; sometimes junk bits. */
    uint32_t flags = f & 3;
    if (f & 0x80)
        flags |= (uint32_t)fz_u8(in) << 2;
    uint64_t addr = addr_field(in);
    uint64_t size = addr_field(in);
    uint64_t offset = addr_field(in);
    put32(0, argsz(in, sizeof(struct vfio_user_dma_map)));
    put32(4, flags);
    put64(8, offset);
    put64(16, addr);
    put64(24, size);
    rec->addr = addr;
    rec->size = size;
    rec->offset = offset;
    rec->flags = flags;
    return sizeof(struct vfio_user_dma_map);
}

static size_t build_dma_unmap(struct fz_in *in)
{
    uint8_t f = fz_u8(in);
    uint32_t flags = f & 3;
    if (f & 0x80)
        flags = fz_u32(in);
    uint64_t addr = (f & 4) ? 0 : addr_field(in);
    uint64_t size = (f & 4) ? 0 : addr_field(in);
    size_t len = sizeof(struct vfio_user_dma_unmap);
    put32(4, flags);
    put64(8, addr);
    put64(16, size);
    if (f & 8) {
        put64(24, (uint64_t)1 << (fz_u8(in) & 63));
        put64(32, fz_u16(in));
        len += sizeof(struct vfio_user_bitmap);
    }
    put32(0, argsz(in, (uint32_t)len));
    return len;
}

/* A body of `fixed` bytes of u32 fields, each either small or from the input. */
static size_t build_words(struct fz_in *in, unsigned words, uint32_t argsz_right)
{
    put32(0, argsz(in, argsz_right));
    for (unsigned i = 1; i < words; i++) {
        uint8_t b = fz_u8(in);
        put32(i * 4, b == 0xff ? fz_u32(in) : b & 0x0f);
    }
    return words * 4;
}

/* SET_IRQS: u8 action/data/index choice, start, count; the data (bools or
 * eventfds) follows the header. */
static size_t build_set_irqs(struct fz_in *in, uint8_t *nfds_wanted)
{
    uint8_t a = fz_u8(in);
    static const uint32_t data[4] = { VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_BOOL,
                                      VFIO_IRQ_SET_DATA_EVENTFD, 0 };
    static const uint32_t action[4] = { VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_MASK,
                                        VFIO_IRQ_SET_ACTION_UNMASK, 0 };
    uint32_t flags = data[a & 3] | action[(a >> 2) & 3];
    if ((a & 3) == 3 || ((a >> 2) & 3) == 3)
        flags = fz_u32(in);
    uint32_t index = (a & 0x10) ? fz_u8(in) : VFIO_PCI_MSIX_IRQ_INDEX;
    uint8_t sb = fz_u8(in), cb = fz_u8(in);
    uint32_t start = sb == 0xff ? fz_u32(in) : sb & 0x1f;
    uint32_t count = cb == 0xff ? fz_u32(in) : cb & 0x1f;
    put32(4, flags);
    put32(8, index);
    put32(12, start);
    put32(16, count);
    size_t len = 20;
    *nfds_wanted = 0;
    if (flags & VFIO_IRQ_SET_DATA_BOOL) {
        for (uint32_t i = 0; i < count && i < 64; i++)
            body[len++] = fz_u8(in) & ((a & 0x20) ? 0xff : 1);
    } else if (flags & VFIO_IRQ_SET_DATA_EVENTFD) {
        *nfds_wanted = (a & 0x20) ? MAX_MSG_FDS : (uint8_t)(count < MAX_MSG_FDS ? count : MAX_MSG_FDS);
    }
    put32(0, argsz(in, (uint32_t)len));
    return len;
}

static const uint32_t regions[] = {
    VFU_PCI_DEV_BAR0_REGION_IDX, VFU_PCI_DEV_BAR4_REGION_IDX, VFU_PCI_DEV_CFG_REGION_IDX,
    VFU_PCI_DEV_BAR1_REGION_IDX, VFU_PCI_DEV_MIGR_REGION_IDX, VFU_PCI_DEV_ROM_REGION_IDX,
    VFU_PCI_DEV_VGA_REGION_IDX, VFU_PCI_DEV_NUM_REGIONS,
};

/* REGION_READ/WRITE: u8 region choice (bits 0-2) and offset kind (bits 3-4:
 * BAR0's areas, the notify area, anywhere, from the input), u16 offset,
 * u8 count (bits 0-3: 1, 2, 4, 8 or other), then the data. */
static size_t build_region_access(struct fz_in *in, bool write)
{
    uint8_t r = fz_u8(in);
    uint32_t region = regions[r & 7];
    uint64_t offset = fz_u16(in);
    switch ((r >> 3) & 3) {
    case 0:
        offset = (offset & 0x3) * 0x1000 + ((offset >> 2) & 0x3f);
        break;
    case 1:
        offset = VN_NOTIFY_OFF + (offset & 0x3f) * VN_NOTIFY_MULTIPLIER;
        break;
    case 2:
        break;
    default:
        offset = (uint64_t)fz_u32(in) << 32 | fz_u32(in);
    }
    uint8_t c = fz_u8(in);
    static const uint32_t counts[8] = { 1, 2, 4, 8, 3, 16, 256, 0 };
    uint32_t count = (c & 0x80) ? fz_u16(in) : counts[c & 7];
    if (r & 0x80)
        count = fz_u32(in);
    put64(0, offset);
    put32(8, region);
    put32(12, count);
    size_t len = 16;
    if (write) {
        size_t n = count < MAX_BODY - 16 ? count : MAX_BODY - 16;
        size_t got;
        const uint8_t *d = fz_bytes(in, n < 64 ? n : 64, &got);
        memcpy(body + len, d, got);
        memset(body + len + got, 0, n - got);
        len += n;
    }
    return len;
}

/* DMA_READ/WRITE (server-to-client commands): as a client would wrongly
 * send them, or as replies nobody asked for. */
static size_t build_dma_rw(struct fz_in *in, bool write)
{
    put64(0, addr_field(in));
    uint16_t count = fz_u16(in) & 0x1ff;
    put64(8, count);
    size_t len = 16;
    if (write) {
        memset(body + len, 0xa5, count);
        len += count;
    }
    return len;
}

static size_t build_dirty_pages(struct fz_in *in)
{
    uint8_t f = fz_u8(in);
    static const uint32_t flags[4] = { VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
                                       VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
                                       VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, 0 };
    put32(4, (f & 3) == 3 ? fz_u32(in) : flags[f & 3]);
    size_t len = 8;
    if (f & 4) {
        put64(8, addr_field(in));
        put64(16, addr_field(in));
        put64(24, (uint64_t)1 << (fz_u8(in) & 31));
        put64(32, fz_u16(in));
        len += sizeof(struct vfio_user_bitmap_range);
    }
    put32(0, argsz(in, (uint32_t)len));
    return len;
}

static size_t build_raw(struct fz_in *in, uint16_t *cmd)
{
    *cmd = fz_u16(in);
    size_t n = fz_u8(in), got;
    const uint8_t *d = fz_bytes(in, n, &got);
    memcpy(body, d, got);
    memset(body + got, 0, n - got);
    return n;
}

/* -- connection ---------------------------------------------------------------------- */

static void disconnect(void)
{
    if (h.client >= 0) {
        close(h.client);
        h.client = -1;
    }
    /* The server notices on its next read: reset (LOST_CONN), DMA regions
     * and interrupts dropped, detached. */
    for (int i = 0; i < 4 * MAX_ROUNDS && h.attached; i++)
        run_once();
    FZ_CHECK(!h.attached, "still attached after the client closed its socket");
}

/* Connect and negotiate with the input's VERSION message (or a good one). */
static void connect_client(struct fz_in *in, bool good)
{
    if (h.client >= 0)
        close(h.client); /* the server dropped it already */
    reply_have = 0;
    h.lied = false;
    h.client = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    FZ_CHECK(h.client >= 0, "socket: %s", strerror(errno));
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", h.path);
    FZ_CHECK(connect(h.client, (struct sockaddr *)&a, sizeof(a)) == 0, "connect: %s",
             strerror(errno));
    uint8_t nfds_wanted = 0;
    unsigned mods = 0;
    size_t len;
    if (good) {
        struct fz_in none = { NULL, 0 };
        len = build_version(&none, &nfds_wanted);
    } else {
        len = build_version(in, &nfds_wanted);
        mods = fz_u8(in) & 0xf;
    }
    int fds[MAX_MSG_FDS];
    bool own[MAX_MSG_FDS];
    int mi;
    int n = attach_fds(in, nfds_wanted, fds, own, &mi);
    send_msg(VFIO_USER_VERSION, mods, in, len, fds, n);
    for (int i = 0; i < n; i++)
        if (own[i])
            close(fds[i]);
    /* The server reads the VERSION message blocking: a message shorter than
     * its header says would wait forever, so the client then also shuts
     * down its side (the stream ends). */
    if (mods & (MOD_SIZE | MOD_CUT))
        shutdown(h.client, SHUT_WR);
    int r = vfu_attach_ctx(h.ctx);
    h.attached = r == 0;
    if (!h.attached) {
        FZ_CHECK(vfu_get_poll_fd(h.ctx) == h.listen_fd, "attach failed but a client is kept");
        close(h.client);
        h.client = -1;
        return;
    }
    /* The server's socket is blocking in production (QEMU sends whole
     * messages); here a message can lie about its size, and the reads of
     * its body must end rather than wait. */
    int cfd = vfu_get_poll_fd(h.ctx);
    fcntl(cfd, F_SETFL, fcntl(cfd, F_GETFL) | O_NONBLOCK);
    int big = 4 << 20;
    if (setsockopt(cfd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof(big)) < 0)
        setsockopt(cfd, SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
    fcntl(h.client, F_SETFL, fcntl(h.client, F_GETFL) | O_NONBLOCK);
    drain();
}

static void op_message(struct fz_in *in, uint8_t op)
{
    unsigned mods = op >> 4;
    uint16_t cmd = op & 0xf;
    uint8_t nfds_wanted = 0;
    size_t len = 0;
    struct sent_map rec = { .memfd = -1 };
    bool is_map = false;
    switch (cmd) {
    case VFIO_USER_VERSION:
        len = build_version(in, &nfds_wanted);
        break;
    case VFIO_USER_DMA_MAP:
        len = build_dma_map(in, &rec);
        is_map = true;
        nfds_wanted = 1 + (fz_u8(in) & 1);
        break;
    case VFIO_USER_DMA_UNMAP:
        len = build_dma_unmap(in);
        break;
    case VFIO_USER_DEVICE_GET_INFO:
        len = build_words(in, 4, sizeof(struct vfio_user_device_info));
        break;
    case VFIO_USER_DEVICE_GET_REGION_INFO:
        len = build_words(in, 8, sizeof(struct vfio_region_info));
        put32(8, fz_u8(in) % (VFU_PCI_DEV_NUM_REGIONS + 1));
        break;
    case VFIO_USER_DEVICE_GET_REGION_IO_FDS:
        len = build_words(in, 4, 1024);
        break;
    case VFIO_USER_DEVICE_GET_IRQ_INFO:
        len = build_words(in, 4, sizeof(struct vfio_irq_info));
        break;
    case VFIO_USER_DEVICE_SET_IRQS:
        len = build_set_irqs(in, &nfds_wanted);
        break;
    case VFIO_USER_REGION_READ:
    case VFIO_USER_REGION_WRITE:
        len = build_region_access(in, cmd == VFIO_USER_REGION_WRITE);
        break;
    case VFIO_USER_DMA_READ:
    case VFIO_USER_DMA_WRITE:
        len = build_dma_rw(in, cmd == VFIO_USER_DMA_WRITE);
        break;
    case VFIO_USER_DEVICE_RESET:
        break;
    case VFIO_USER_DIRTY_PAGES:
        len = build_dirty_pages(in);
        break;
    default:
        len = build_raw(in, &cmd);
        nfds_wanted = fz_u8(in) & 3;
        break;
    }
    int fds[MAX_MSG_FDS];
    bool own[MAX_MSG_FDS];
    int n = attach_fds(in, nfds_wanted, fds, own, &rec.memfd);
    if (is_map && h.nmaps < MAX_SENT) {
        rec.msg_id = h.next_id;
        h.maps[h.nmaps++] = rec;
    }
    send_msg(cmd, mods, in, len, fds, n);
    for (int i = 0; i < n; i++)
        if (own[i])
            close(fds[i]);
}

/* -- device and context ----------------------------------------------------------- */

static void quiet_log(void *py, int level, const char *msg)
{
    (void)py;
    static int verbose = -1;
    if (verbose < 0)
        verbose = getenv("FZ_VERBOSE") != NULL;
    if (verbose)
        fprintf(stderr, "log %d: %s\n", level, msg);
}

/* The control plane's BAR0 (common config, ISR, device config) is Python;
 * here it is plain memory: what matters is that server.c hands it only
 * accesses inside BAR0 and outside the notify area. */
static int bar_access(void *py, uint64_t offset, uint8_t *buf, uint32_t count, int is_write)
{
    (void)py;
    FZ_CHECK(count >= 1 && count <= 8 && offset + count <= VN_BAR0_SIZE &&
                 (offset + count <= VN_NOTIFY_OFF || offset >= VN_NOTIFY_OFF + VN_NOTIFY_LEN),
             "bar_access 0x%llx+%u", (unsigned long long)offset, count);
    if (is_write)
        memcpy(h.bar0 + offset, buf, count);
    else
        memcpy(buf, h.bar0 + offset, count);
    return 0;
}

static void add_cap(const uint8_t *cap, int flags)
{
    ssize_t r = vfu_pci_add_capability(h.ctx, 0, flags, (void *)cap);
    FZ_CHECK(r > 0, "vfu_pci_add_capability: %s", strerror(errno));
}

static void virtio_cap(uint8_t type, uint32_t off, uint32_t len, bool notify)
{
    uint8_t c[20] = { 0x09, 0, notify ? 20 : 16, type, 0, 0, 0, 0 };
    memcpy(c + 8, &off, 4);
    memcpy(c + 12, &len, 4);
    uint32_t mult = VN_NOTIFY_MULTIPLIER;
    memcpy(c + 16, &mult, 4);
    add_cap(c, VFU_CAP_FLAG_READONLY);
}

/* What vfiouser_net/pci_setup.py does: identity, virtio and MSI-X capabilities,
 * server.c's callbacks, realize. */
static void setup(uint8_t how)
{
    static const uint8_t mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
    unsigned qps = (how & 3) + 1;
    h.dev = vn_dev_new(qps, mac, 1500);
    FZ_CHECK(h.dev != NULL, "vn_dev_new");
    struct vn_hooks hooks = { .bar_access = bar_access, .log = quiet_log };
    vn_dev_set_hooks(h.dev, &hooks);
    if (how & 4)
        FZ_CHECK(vn_dev_enable_notify_polling(h.dev) == 0, "notify polling");
    unlink(h.path);
    h.ctx = vfu_create_ctx(VFU_TRANS_SOCK, h.path, LIBVFIO_USER_FLAG_ATTACH_NB, h.dev,
                           VFU_DEV_TYPE_PCI);
    FZ_CHECK(h.ctx != NULL, "vfu_create_ctx: %s", strerror(errno));
    h.listen_fd = vfu_get_poll_fd(h.ctx);
    FZ_CHECK(vfu_pci_init(h.ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL, 0) == 0,
             "vfu_pci_init");
    vfu_pci_set_id(h.ctx, 0x1af4, 0x1041, 0x1af4, 0x1100);
    vfu_pci_set_class(h.ctx, 0x02, 0x00, 0x00);
    virtio_cap(1, VN_COMMON_CFG_OFF, VN_COMMON_CFG_LEN, false);
    virtio_cap(2, VN_NOTIFY_OFF, VN_NOTIFY_LEN, true);
    virtio_cap(3, VN_ISR_OFF, VN_ISR_LEN, false);
    virtio_cap(4, VN_DEVICE_CFG_OFF, 64, false);
    uint16_t nvec = (uint16_t)(2 * qps + 2);
    uint8_t msix[12] = { 0x11, 0 };
    uint16_t ctl = nvec - 1;
    uint32_t table = VN_MSIX_TABLE_OFF | VN_MSIX_BAR, pba = VN_MSIX_PBA_OFF | VN_MSIX_BAR;
    memcpy(msix + 2, &ctl, 2);
    memcpy(msix + 4, &table, 4);
    memcpy(msix + 8, &pba, 4);
    add_cap(msix, 0);
    FZ_CHECK(vn_server_setup(h.dev, h.ctx, LOG_DEBUG) == 0, "vn_server_setup");
    FZ_CHECK(vfu_realize_ctx(h.ctx) == 0, "vfu_realize_ctx: %s", strerror(errno));
}

static unsigned count_client_mappings(void)
{
    unsigned nm = read_maps(), n = 0;
    for (unsigned k = 0; k < nm; k++)
        if (memfd_of_ino(maps[k].ino) != NULL && maps[k].ino != 0)
            n++;
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (h.dir[0] == 0) {
        snprintf(h.dir, sizeof(h.dir), "%s/vfz.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
        FZ_CHECK(mkdtemp(h.dir) != NULL, "mkdtemp: %s", strerror(errno));
        snprintf(h.path, sizeof(h.path), "%s/s", h.dir);
    }
    struct fz_in in = { data, size };
    int fds0 = count_fds();
    h.heap0 = __sanitizer_get_current_allocated_bytes();
    h.client = -1;
    h.attached = false;
    h.nmf = 0;
    h.nmaps = 0;
    h.next_id = 1;
    h.mem_gen = 0;
    h.mem_dirty = false;
    h.any_shrunk = false;
    memset(h.pending, 0xff, sizeof(h.pending));
    memset(h.bar0, 0, sizeof(h.bar0));

    setup(fz_u8(&in));
    int fds1 = count_fds();
    connect_client(&in, false);
    serve();
    unsigned ops = 0;
    while (in.n > 0 && ops++ < 256) {
        uint8_t op = fz_u8(&in);
        if (op == 0xf0) {
            disconnect();
            connect_client(&in, true);
        } else if (op == 0xf1) {
            uint8_t k = fz_u8(&in), pages = fz_u8(&in);
            if (h.nmf > 0) {
                struct memfd_rec *m = &h.mf[k % h.nmf];
                uint64_t to = (uint64_t)(pages & 0x1f) * PAGE;
                if (to < m->size && ftruncate(m->fd, (off_t)to) == 0) {
                    m->size = to;
                    m->shrunk = true;
                    h.any_shrunk = true;
                    h.mem_dirty = true;
                }
            }
        } else {
            if (!h.attached)
                connect_client(&in, true);
            if (!h.attached)
                continue;
            op_message(&in, op);
        }
        serve();
        check_guest_mem();
    }

    disconnect();
    FZ_CHECK(h.dev->mem.n == 0, "%u guest regions left after the client went away",
             h.dev->mem.n);
    unsigned left = count_client_mappings();
    FZ_CHECK(left == 0, "%u mappings of client memfds left after the client went away", left);
    memfds_close();
    int fds2 = count_fds();
    if (fds2 != fds1)
        dump_fds();
    FZ_CHECK(fds2 == fds1, "%d fds after the client went away, %d before it came", fds2, fds1);

    vfu_destroy_ctx(h.ctx);
    h.ctx = NULL;
    vn_dev_free(h.dev);
    h.dev = NULL;
    unlink(h.path);
    int fds3 = count_fds();
    if (fds3 != fds0)
        dump_fds();
    FZ_CHECK(fds3 == fds0, "%d fds after teardown, %d before the input", fds3, fds0);
    return 0;
}
