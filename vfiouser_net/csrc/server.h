/* libvfio-user glue: callbacks and the context thread's loop. */
#ifndef VN_SERVER_H
#define VN_SERVER_H

struct vn_dev;

/* Register BAR0 (virtio structures and doorbells), BAR4 (MSI-X), DMA,
 * quiesce, reset and log callbacks on a created, not yet realized context. */
int vn_server_setup(struct vn_dev *dev, void *vfu_ctx, int log_level);
/* Serve clients one after another until vn_server_stop(); call from the one
 * thread that owns the context. */
int vn_server_run(struct vn_dev *dev);
void vn_server_stop(struct vn_dev *dev);

#endif
