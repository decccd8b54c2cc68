"""Names and bounds of the device's and the daemon's options, in one place.

The daemon (device, configuration file, command line), its admin schema and
the admin clients take them from here; a client imports nothing of the
datapath for them. What the datapath itself defines is checked against it by
tests/unit/test_admin_protocol.py: the steering policies are its `enum
vn_policy` in order (vn_policy_name), the queue limits its VN_MAX_QUEUE_PAIRS
and VN_VQ_MAX_SIZE, so that the schema refuses what the datapath cannot do.
"""

from __future__ import annotations

# Index = enum vn_policy (csrc/steering.h).
STEERING_POLICIES = ("auto", "single", "rss", "rx-follows-tx")
# Doorbells as vfio-user messages, or a shared page the workers poll.
NOTIFY_MODES = ("message", "poll")
# How frames reach the TAP: "io_uring" batches a ring pass's writes into one
# system call (csrc/tap_batch.h), "writev" makes one a frame; "auto" (the
# default) takes io_uring where the kernel allows it.
TAP_IO_MODES = ("auto", "io_uring", "writev")
DEFAULT_TAP_IO = "auto"
DEFAULT_BUSY_POLL_US = 50
MAX_BUSY_POLL_US = 10000
# The datapath's limits (csrc: VN_MAX_QUEUE_PAIRS, VN_VQ_MAX_SIZE).
MAX_QUEUE_PAIRS = 16
MAX_QUEUE_SIZE = 4096
LOG_LEVELS = ("debug", "info", "warning", "error")
