/* csrc/sandbox.h, as cffi sees it. */
struct vn_sandbox_limits {
    uint64_t nofile;
    uint64_t data_bytes;
};
int vn_sandbox_enter(const struct vn_sandbox_limits *lim);
uint64_t vn_sandbox_refused(void);
