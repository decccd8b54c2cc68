/* The part of libvfio-user (revision 0b28d205) the control plane calls. */
typedef struct vfu_ctx vfu_ctx_t;

typedef enum { VFU_TRANS_SOCK, VFU_TRANS_PIPE, VFU_TRANS_MAX } vfu_trans_t;
typedef enum { VFU_DEV_TYPE_PCI } vfu_dev_type_t;
typedef enum {
    VFU_PCI_TYPE_CONVENTIONAL,
    VFU_PCI_TYPE_PCI_X_1,
    VFU_PCI_TYPE_PCI_X_2,
    VFU_PCI_TYPE_EXPRESS
} vfu_pci_type_t;

#define LIBVFIO_USER_FLAG_ATTACH_NB ...
#define VFU_CAP_FLAG_READONLY ...
#define PCI_HEADER_TYPE_NORMAL ...

vfu_ctx_t *vfu_create_ctx(vfu_trans_t trans, const char *path, int flags, void *pvt,
                          vfu_dev_type_t dev_type);
int vfu_realize_ctx(vfu_ctx_t *vfu_ctx);
void vfu_destroy_ctx(vfu_ctx_t *vfu_ctx);
int vfu_get_poll_fd(vfu_ctx_t *vfu_ctx);
int vfu_pci_init(vfu_ctx_t *vfu_ctx, vfu_pci_type_t pci_type, int hdr_type, int revision);
void vfu_pci_set_id(vfu_ctx_t *vfu_ctx, uint16_t vid, uint16_t did, uint16_t ssvid, uint16_t ssid);
void vfu_pci_set_class(vfu_ctx_t *vfu_ctx, uint8_t base, uint8_t sub, uint8_t pi);
void *vfu_pci_get_config_space(vfu_ctx_t *vfu_ctx);
ssize_t vfu_pci_add_capability(vfu_ctx_t *vfu_ctx, size_t pos, int flags, void *data);
