/* Logging from the datapath through the control plane's logger (device.c). */
#ifndef VN_LOG_H
#define VN_LOG_H

struct vn_dev;

/* Any thread. Warnings and errors: at most VN_LOG_PER_SEC a second and
 * device; then how many were left out. */
#define VN_LOG_PER_SEC 20
void vn_log(struct vn_dev *dev, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
