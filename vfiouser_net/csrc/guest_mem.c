#include "guest_mem.h"

#include <errno.h>
#include <string.h>

void vn_mem_init(struct vn_mem *m)
{
    memset(m, 0, sizeof(*m));
}

int vn_mem_add(struct vn_mem *m, uint64_t gpa, uint64_t len, void *hva, bool writable)
{
    if (m->n >= VN_MAX_DMA_REGIONS || len == 0 || hva == NULL || gpa + len < gpa)
        return -EINVAL;
    for (unsigned i = 0; i < m->n; i++) {
        const struct vn_mem_region *r = &m->r[i];
        if (gpa < r->gpa + r->len && r->gpa < gpa + len)
            return -EEXIST;
    }
    m->r[m->n++] = (struct vn_mem_region){ gpa, len, hva, writable };
    m->generation++;
    return 0;
}

int vn_mem_remove(struct vn_mem *m, uint64_t gpa, uint64_t len)
{
    for (unsigned i = 0; i < m->n; i++) {
        if (m->r[i].gpa == gpa && m->r[i].len == len) {
            m->r[i] = m->r[--m->n];
            m->generation++;
            return 0;
        }
    }
    return -ENOENT;
}

void vn_mem_clear(struct vn_mem *m)
{
    m->n = 0;
    m->generation++;
}

void *vn_mem_translate(const struct vn_mem *m, uint64_t gpa, uint64_t len, bool write)
{
    if (gpa + len < gpa)
        return NULL;
    for (unsigned i = 0; i < m->n; i++) {
        const struct vn_mem_region *r = &m->r[i];
        if (gpa >= r->gpa && gpa - r->gpa <= r->len && len <= r->len - (gpa - r->gpa)) {
            if (write && !r->writable)
                return NULL;
            return r->hva + (gpa - r->gpa);
        }
    }
    return NULL;
}
