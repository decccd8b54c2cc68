"""A hostile virtio-net driver: attacks a vfiouser-net device while healthy
traffic runs on its other queue pairs, and checks that the damage stays with
the attacked queue (or, where the spec says so, the device), that the device
writes nothing but its used rings and the buffers it was offered, and that
every event is counted.

Built on the tests' own vfio-user client and virtio driver
(:mod:`vfiouser_net_harness.vfio_user_client`, :mod:`vfiouser_net_harness.virtio_pci_driver`):

* **Device**: 4 queue pairs with MQ and RSS (VQ_PAIRS_SET 4, an RSS table
  ``[0, 1, 2, 3]`` over UDP/IPv4), so that host-to-guest flows land on a
  known pair. Pair 0 is the one attacked; pairs 1-3 carry healthy traffic.
* **Healthy traffic**: a background thread sends frames from the host side of
  the TAP to pairs 1-3 and receives them from their receive rings, and makes
  the guest transmit on pairs 1-3 and sees the frames arrive on the TAP. All
  use of the one vfio-user socket goes through :class:`LockedClient` (one
  lock), so the attacks and the traffic can share it.
* **Guest memory**: 8 MiB, DMA-mapped as three regions with unmapped holes
  between them (A: the driver's rings and buffers; B: pair 0's rings;
  C: the attacks' own buffers), filled with a canary pattern. Every write by
  the tool goes through :class:`TrackedGuestMemory`, which keeps a shadow
  copy; after each attack, any byte that differs from the shadow was written
  by the device and must lie in a used ring or in a buffer offered as
  device-writable (and never in a region while it is unmapped).
* **Catalogue**: :data:`CATALOGUE`, one function per attack, each with its
  scope (``queue``: the attacked queue only, healthy pairs must keep
  flowing during the attack; ``device``: the whole device, as the spec
  allows) and its expected counters and reaction. After an attack that broke
  the device (DEVICE_NEEDS_RESET) the tool resets it, brings it up again and
  checks that traffic works, on the attacked pair too.

The daemon's counters come from a callable (the protocol tests pass
``DeviceEnv.counters``; the command line reads them from the admin socket).

Command line (run it where the TAP is, e.g. under ``ip netns exec``)::

    python -m vfiouser_net_harness.hostile_driver --socket PATH --tap IFNAME \\
        --admin-socket PATH [--attacks a,b,...] [--json out.json] [--list]

Exit status 0 when every attack had its expected outcome, 1 otherwise.
"""

from vfiouser_net_harness.hostile_driver.catalogue import CATALOGUE, SECURITY_ATTACKS
from vfiouser_net_harness.hostile_driver.counters import admin_sources, daemon_rss_anon_kib
from vfiouser_net_harness.hostile_driver.driver import HostileDriver

__all__ = ["CATALOGUE", "SECURITY_ATTACKS", "HostileDriver", "admin_sources", "daemon_rss_anon_kib"]
