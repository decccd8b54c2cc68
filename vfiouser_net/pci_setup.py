"""The vfio-user context of one device, set up in one straight recipe as
libvfio-user's samples do: listen, PCI identity, the virtio vendor
capabilities, MSI-X, the datapath's regions and callbacks, realize.

Runs once, before the context thread exists; afterwards only that thread
touches the context (see README, "Threads and guest memory").
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from vfiouser_net import pci_config
from vfiouser_net.device_options import DeviceError, DeviceOptions
from vfiouser_net.native import ffi, lib, vfu_check, vn_check
from vfiouser_net.net_config import NET_CONFIG_SIZE
from vfiouser_net.unix_socket import SocketPathError, claim_socket_path
from vfiouser_net.virtio_spec import (
    PCI_CLASS_NETWORK_ETHERNET,
    VIRTIO_NET_PCI_DEVICE,
    VIRTIO_PCI_SUBSYS_DEVICE,
    VIRTIO_PCI_VENDOR,
)

# logging's levels to the syslog levels libvfio-user and the datapath take.
_LOGGING_TO_SYSLOG = {10: 7, 20: 6, 30: 4, 40: 3, 50: 2}


def create_context(dev: Any, opts: DeviceOptions, num_vectors: int, log_level: int) -> Any:
    """A realized vfu_ctx_t for the datapath device `dev`, listening on
    opts.socket_path or on the socket opts.listen_fd. Raises DeviceError."""
    fd = opts.listen_fd
    if fd is None:
        path = opts.socket_path
        try:
            claim_socket_path(path)
        except SocketPathError as exc:
            raise DeviceError(str(exc)) from exc
    else:
        # libvfio-user (this revision) only binds paths: let it bind a
        # throw-away one, then put the socket we were given in its place.
        tmpdir = tempfile.mkdtemp(prefix="vfiouser-net-")
        path = os.path.join(tmpdir, "unused.sock")
    ctx = lib.vfu_create_ctx(
        lib.VFU_TRANS_SOCK, path.encode(), lib.LIBVFIO_USER_FLAG_ATTACH_NB, dev,
        lib.VFU_DEV_TYPE_PCI,
    )  # fmt: skip
    if ctx == ffi.NULL:
        raise DeviceError(f"cannot listen on {path}: {os.strerror(ffi.errno)}")
    if fd is not None:
        listen_fd = lib.vfu_get_poll_fd(ctx)
        os.dup2(fd, listen_fd)
        os.set_blocking(listen_fd, False)
        if fd != listen_fd:
            os.close(fd)
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    try:
        _setup_pci(ctx, dev, opts, num_vectors, log_level)
    except Exception:
        lib.vfu_destroy_ctx(ctx)
        raise
    return ctx


def _check(rc: int, what: str) -> None:
    vfu_check(rc, what, DeviceError)


def _setup_pci(ctx: Any, dev: Any, opts: DeviceOptions, num_vectors: int, log_level: int) -> None:
    _check(
        lib.vfu_pci_init(ctx, lib.VFU_PCI_TYPE_CONVENTIONAL, lib.PCI_HEADER_TYPE_NORMAL, 0),
        "PCI init",
    )
    lib.vfu_pci_set_id(
        ctx, VIRTIO_PCI_VENDOR, VIRTIO_NET_PCI_DEVICE, VIRTIO_PCI_VENDOR, VIRTIO_PCI_SUBSYS_DEVICE
    )
    lib.vfu_pci_set_class(ctx, *PCI_CLASS_NETWORK_ETHERNET)
    # libvfio-user ignores its revision argument; virtio 1.x wants >= 1.
    cfg = ffi.cast("uint8_t *", lib.vfu_pci_get_config_space(ctx))
    cfg[pci_config.PCI_REVISION_ID_OFFSET] = pci_config.VIRTIO_PCI_REVISION
    caps = pci_config.virtio_caps(
        bar=0,
        common=(lib.VN_COMMON_CFG_OFF, lib.VN_COMMON_CFG_LEN),
        isr=(lib.VN_ISR_OFF, lib.VN_ISR_LEN),
        device=(lib.VN_DEVICE_CFG_OFF, NET_CONFIG_SIZE),
        notify=(lib.VN_NOTIFY_OFF, lib.VN_NOTIFY_LEN),
        notify_multiplier=lib.VN_NOTIFY_MULTIPLIER,
    )
    for cap in caps:
        _check(
            lib.vfu_pci_add_capability(ctx, 0, lib.VFU_CAP_FLAG_READONLY, ffi.from_buffer(cap)),
            "adding a virtio capability",
        )
    msix = pci_config.msix_cap(
        num_vectors, lib.VN_MSIX_BAR, lib.VN_MSIX_TABLE_OFF, lib.VN_MSIX_PBA_OFF
    )
    _check(lib.vfu_pci_add_capability(ctx, 0, 0, ffi.from_buffer(msix)), "adding MSI-X")
    lib.vn_dev_set_busy_poll(dev, opts.busy_poll_us)
    lib.vn_dev_set_tx_inline(dev, opts.tx_inline)
    if opts.notify_mode == "poll":
        vn_check(lib.vn_dev_enable_notify_polling(dev), "doorbell polling page", DeviceError)
    # The regions (BAR0, MSI-X), DMA and IRQ callbacks are the datapath's (server.c).
    syslog_level = _LOGGING_TO_SYSLOG.get(log_level, 6)
    vn_check(lib.vn_server_setup(dev, ctx, syslog_level), "device setup", DeviceError)
    _check(lib.vfu_realize_ctx(ctx), "realizing the device")
