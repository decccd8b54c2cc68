#include "tap.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
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
