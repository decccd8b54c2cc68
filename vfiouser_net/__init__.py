"""vfiouser-net: a virtio-net PCI device served over vfio-user."""

__version__ = "0.1.0"
