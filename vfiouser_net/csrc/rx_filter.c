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
