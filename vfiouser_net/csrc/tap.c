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
    }
    if (ioctl(fd, TUNSETOFFLOAD, flags) < 0)
        return -errno;
    return 0;
}

int vn_tap_set_vnet_hdr_len(int fd, int len)
{
    if (ioctl(fd, TUNSETVNETHDRSZ, &len) < 0)
        return -errno;
    return 0;
}

int vn_tap_set_flow_steering(int fd)
{
    /* r0 = skb->hash; return r0 (tun takes it modulo the number of queues). */
    struct bpf_insn prog[2] = {
        { .code = BPF_LDX | BPF_MEM | BPF_W, .dst_reg = BPF_REG_0, .src_reg = BPF_REG_1,
          .off = offsetof(struct __sk_buff, hash) },
        { .code = BPF_JMP | BPF_EXIT },
    };
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    attr.insn_cnt = 2;
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
