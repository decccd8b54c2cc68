#include "tap.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/bpf.h>
#include <linux/if_tun.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

/* UDP segmentation offload on a TAP: Linux 6.2 (older uapi headers lack it). */
#ifndef TUN_F_USO4
#define TUN_F_USO4 0x20
#define TUN_F_USO6 0x40
#endif

#include "net_hdr.h"

int vn_tap_open(const char *name, bool multi_queue, char *ifname_out)
{
    struct ifreq ifr;
    if (strlen(name) >= IFNAMSIZ)
        return -ENAMETOOLONG;
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (multi_queue ? IFF_MULTI_QUEUE : 0);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    int hdr = VN_NET_HDR_LEN;
    if (ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    /* Nothing offloaded until the guest negotiates it. */
    if (ioctl(fd, TUNSETOFFLOAD, 0) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    memcpy(ifname_out, ifr.ifr_name, IFNAMSIZ);
    ifname_out[IFNAMSIZ - 1] = '\0';
    return fd;
}

int vn_tap_set_guest_offloads(int fd, uint64_t f)
{
    unsigned flags = 0;
    if (VN_HAS(f, VN_F_GUEST_CSUM)) {
        flags |= TUN_F_CSUM;
        if (VN_HAS(f, VN_F_GUEST_TSO4))
            flags |= TUN_F_TSO4;
        if (VN_HAS(f, VN_F_GUEST_TSO6))
            flags |= TUN_F_TSO6;
        if (VN_HAS(f, VN_F_GUEST_ECN) && (flags & (TUN_F_TSO4 | TUN_F_TSO6)))
            flags |= TUN_F_TSO_ECN;
        /* The TAP takes both or neither (EINVAL): with one of them the
         * kernel segments UDP itself, and the guest never sees UDP_L4. */
        if (VN_HAS(f, VN_F_GUEST_USO4) && VN_HAS(f, VN_F_GUEST_USO6))
            flags |= TUN_F_USO4 | TUN_F_USO6;
    }
    if (ioctl(fd, TUNSETOFFLOAD, flags) < 0)
        return -errno;
    return 0;
}

int vn_tap_probe_uso(int fd)
{
    /* The kernel refuses offload bits it does not know (EINVAL). */
    if (ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6) < 0)
        return errno == EINVAL ? 0 : -errno;
    if (ioctl(fd, TUNSETOFFLOAD, 0) < 0)
        return -errno;
    return 1;
}

int vn_tap_set_vnet_hdr_len(int fd, int len)
{
    if (ioctl(fd, TUNSETVNETHDRSZ, &len) < 0)
        return -errno;
    return 0;
}

/* eBPF instruction builders (the kernel's filter.h macros are not uapi). */
#define I_ALU64_IMM(op_, d_, i_) \
    ((struct bpf_insn){ .code = BPF_ALU64 | BPF_K | (op_), .dst_reg = (d_), .imm = (i_) })
#define I_ALU64_REG(op_, d_, s_) \
    ((struct bpf_insn){ .code = BPF_ALU64 | BPF_X | (op_), .dst_reg = (d_), .src_reg = (s_) })
#define I_ALU32_IMM(op_, d_, i_) \
    ((struct bpf_insn){ .code = BPF_ALU | BPF_K | (op_), .dst_reg = (d_), .imm = (i_) })
#define I_LD_ABS(sz_, o_) ((struct bpf_insn){ .code = BPF_LD | BPF_ABS | (sz_), .imm = (o_) })
#define I_LD_IND(sz_, s_, o_) \
    ((struct bpf_insn){ .code = BPF_LD | BPF_IND | (sz_), .src_reg = (s_), .imm = (o_) })
#define I_JEQ_IMM(d_, i_, o_) \
    ((struct bpf_insn){ .code = BPF_JMP | BPF_JEQ | BPF_K, .dst_reg = (d_), .imm = (i_), .off = (o_) })
#define I_JNE_IMM(d_, i_, o_) \
    ((struct bpf_insn){ .code = BPF_JMP | BPF_JNE | BPF_K, .dst_reg = (d_), .imm = (i_), .off = (o_) })
#define I_JA(o_) ((struct bpf_insn){ .code = BPF_JMP | BPF_JA, .off = (o_) })
#define I_EXIT() ((struct bpf_insn){ .code = BPF_JMP | BPF_EXIT })

int vn_tap_set_flow_steering(int fd)
{
    /* The TAP queue a frame goes to is this program's result modulo the
     * number of queues: the frame's flow hash, so one flow always meets the
     * same reader (tun's automatic selection would move a flow when the
     * guest transmits it on another queue). skb->hash is 0 for frames that
     * no one hashed (injected by a packet socket, forwarded without RPS):
     * then hash the IPv4/IPv6 addresses and TCP/UDP ports here. LD_ABS/IND
     * read at skb->data (the Ethernet header) and end the program with 0 if
     * the frame is too short. */
    enum { R0 = BPF_REG_0, R1 = BPF_REG_1, R6 = BPF_REG_6, R7 = BPF_REG_7, R8 = BPF_REG_8 };
    struct bpf_insn prog[] = {
        /* 0 */ I_ALU64_REG(BPF_MOV, R6, R1), /* LD_ABS needs the context in r6 */
        /* 1 */ { .code = BPF_LDX | BPF_MEM | BPF_W, .dst_reg = R0, .src_reg = R1,
                  .off = offsetof(struct __sk_buff, hash) },
        /* 2 */ I_JEQ_IMM(R0, 0, 1),
        /* 3 */ I_EXIT(),
        /* 4 */ I_LD_ABS(BPF_H, 12), /* ethertype */
        /* 5 */ I_JEQ_IMM(R0, 0x0800, 2),
        /* 6 */ I_JEQ_IMM(R0, 0x86dd, 15),
        /* 7 */ I_EXIT(), /* r0 = ethertype: not IP, any fixed queue will do */
        /* IPv4: addresses, then the ports after the IHL-sized header. */
        /* 8 */ I_LD_ABS(BPF_W, 26),
        /* 9 */ I_ALU64_REG(BPF_MOV, R7, R0),
        /* 10 */ I_LD_ABS(BPF_W, 30),
        /* 11 */ I_ALU64_REG(BPF_XOR, R7, R0),
        /* 12 */ I_LD_ABS(BPF_B, 23), /* protocol */
        /* 13 */ I_JEQ_IMM(R0, 6, 1),
        /* 14 */ I_JNE_IMM(R0, 17, 23), /* -> mix */
        /* 15 */ I_LD_ABS(BPF_B, 14),
        /* 16 */ I_ALU64_IMM(BPF_AND, R0, 0xf),
        /* 17 */ I_ALU64_IMM(BPF_LSH, R0, 2),
        /* 18 */ I_ALU64_REG(BPF_MOV, R8, R0),
        /* 19 */ I_LD_IND(BPF_W, R8, 14),
        /* 20 */ I_ALU64_REG(BPF_XOR, R7, R0),
        /* 21 */ I_JA(16), /* -> mix */
        /* IPv6: both addresses, then the ports if the next header is TCP/UDP. */
        /* 22 */ I_LD_ABS(BPF_W, 22),
        /* 23 */ I_ALU64_REG(BPF_MOV, R7, R0),
        /* 24 */ I_LD_ABS(BPF_W, 26),
        /* 25 */ I_ALU64_REG(BPF_XOR, R7, R0),
        /* 26 */ I_LD_ABS(BPF_W, 30),
        /* 27 */ I_ALU64_REG(BPF_XOR, R7, R0),
        /* 28 */ I_LD_ABS(BPF_W, 34),
        /* 29 */ I_ALU64_REG(BPF_XOR, R7, R0),
        /* 30 */ I_LD_ABS(BPF_W, 38),
        /* 31 */ I_ALU64_REG(BPF_XOR, R7, R0),
        /* 32 */ I_LD_ABS(BPF_B, 20), /* next header */
        /* 33 */ I_JEQ_IMM(R0, 6, 1),
        /* 34 */ I_JNE_IMM(R0, 17, 3), /* -> mix */
        /* 35 */ I_LD_ABS(BPF_W, 54),
        /* 36 */ I_ALU64_REG(BPF_XOR, R7, R0),
        /* 37 */ I_JA(0),
        /* mix: spread the bits so that the modulo sees all of them. */
        /* 38 */ I_ALU64_REG(BPF_MOV, R0, R7),
        /* 39 */ I_ALU32_IMM(BPF_MUL, R0, (int32_t)0x9e3779b1),
        /* 40 */ I_ALU64_REG(BPF_MOV, R7, R0),
        /* 41 */ I_ALU32_IMM(BPF_RSH, R7, 16),
        /* 42 */ I_ALU64_REG(BPF_XOR, R0, R7),
        /* 43 */ I_EXIT(),
    };
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    attr.insn_cnt = sizeof(prog) / sizeof(prog[0]);
    attr.insns = (uint64_t)(uintptr_t)prog;
    attr.license = (uint64_t)(uintptr_t)"GPL";
    int prog_fd = (int)syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
    if (prog_fd < 0)
        return -errno;
    if (ioctl(fd, TUNSETSTEERINGEBPF, &prog_fd) < 0) {
        int err = -errno;
        close(prog_fd);
        return err;
    }
    return prog_fd;
}

void vn_tap_clear_flow_steering(int fd)
{
    /* The program stays attached to a persistent TAP otherwise, and would
     * choose the queues for its next user. */
    int none = -1;
    (void)ioctl(fd, TUNSETSTEERINGEBPF, &none);
}

int vn_tap_set_queue_attached(int fd, bool attached)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = attached ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE;
    if (ioctl(fd, TUNSETQUEUE, &ifr) < 0)
        return -errno;
    return 0;
}

int vn_tap_is_up(const char *ifname)
{
    struct ifreq ifr;
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -errno;
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    int ret = ioctl(s, SIOCGIFFLAGS, &ifr);
    int err = errno;
    close(s);
    if (ret < 0)
        return -err;
    return (ifr.ifr_flags & IFF_UP) ? 1 : 0;
}
