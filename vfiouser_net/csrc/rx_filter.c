#include "rx_filter.h"

#include <string.h>

void vn_rx_filter_reset(struct vn_rx_filter *f, const uint8_t mac[6])
{
    memset(f, 0, sizeof(*f));
    memcpy(f->mac, mac, 6);
    f->promisc = true;
}

static bool in_table(const uint8_t (*t)[6], unsigned n, const uint8_t dst[6])
{
    for (unsigned i = 0; i < n; i++)
        if (memcmp(t[i], dst, 6) == 0)
            return true;
    return false;
}

bool vn_rx_filter_accepts(const struct vn_rx_filter *f, const uint8_t dst[6])
{
    static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    if (f->promisc)
        return true;
    if (dst[0] & 1) {
        if (memcmp(dst, bcast, 6) == 0 || f->allmulti || f->multi_overflow)
            return true;
        return in_table(f->mc, f->n_mc, dst);
    }
    if (f->uni_overflow || memcmp(dst, f->mac, 6) == 0)
        return true;
    return in_table(f->uc, f->n_uc, dst);
}

#define ETH_P_8021Q 0x8100

bool vn_rx_filter_vlan_accepts(const struct vn_rx_filter *f, const uint8_t *frame, size_t len)
{
    if (!f->vlan_filter || len < 16 || (frame[12] << 8 | frame[13]) != ETH_P_8021Q)
        return true;
    unsigned vid = (unsigned)(frame[14] << 8 | frame[15]) & 0xfffu;
    return (__atomic_load_n(&f->vlans[vid / 64], __ATOMIC_RELAXED) >> (vid % 64)) & 1u;
}

void vn_rx_filter_vlan_set(struct vn_rx_filter *f, uint16_t vid, bool on)
{
    uint64_t bit = 1ull << (vid % 64);
    if (on)
        __atomic_fetch_or(&f->vlans[vid / 64], bit, __ATOMIC_RELAXED);
    else
        __atomic_fetch_and(&f->vlans[vid / 64], ~bit, __ATOMIC_RELAXED);
}
