#include "notify_page.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int vn_notify_page_init(struct vn_notify_page *np, uint32_t bar_size, uint32_t off, uint32_t len)
{
    np->fd = -1;
    np->map = NULL;
    np->len = 0;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0 || off % (uint32_t)page != 0 || len % (uint32_t)page != 0 || off + len > bar_size)
        return -EINVAL;
    int fd = memfd_create("vfiouser-net-notify", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -errno;
    /* The client maps this file too: sealed, it cannot shrink it under our
     * mapping (every poll would then die of SIGBUS) nor grow it. */
    if (ftruncate(fd, bar_size) < 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off);
    if (m == MAP_FAILED) {
        int e = errno;
        close(fd);
        return -e;
    }
    np->fd = fd;
    np->map = m;
    np->len = len;
    vn_notify_page_clear(np);
    return 0;
}

void vn_notify_page_fini(struct vn_notify_page *np)
{
    if (np->map != NULL)
        munmap(np->map, np->len);
    if (np->fd >= 0)
        close(np->fd);
    np->map = NULL;
    np->fd = -1;
    np->len = 0;
}

void vn_notify_page_clear(struct vn_notify_page *np)
{
    if (np->map != NULL)
        memset(np->map, 0xff, np->len);
}
