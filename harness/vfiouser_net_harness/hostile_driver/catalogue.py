"""The catalogue: every attack with its scope and expected reaction, in the order they run."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vfiouser_net_harness.hostile_driver.attack import Attack, AttackRun
from vfiouser_net_harness.hostile_driver.ctrl import (
    attack_ctrl_malformed_commands,
    attack_ctrl_queue_busy,
    attack_ctrl_ring_corrupt,
)
from vfiouser_net_harness.hostile_driver.dma_map import (
    attack_dma_file_truncated,
    attack_dma_map_beyond_file,
    attack_dma_map_no_access,
    attack_dma_map_repeated,
    attack_dma_map_unaligned_offset,
    attack_dma_map_write_only,
)
from vfiouser_net_harness.hostile_driver.dma_unmap import (
    attack_dma_unmap_buffers_in_use,
    attack_dma_unmap_during_steering_drain,
    attack_dma_unmap_rings_in_use,
    attack_rings_in_unmapped_memory,
)
from vfiouser_net_harness.hostile_driver.doorbells import (
    attack_bar0_writes,
    attack_config_space_writes,
    attack_doorbells_before_driver_ok,
    attack_doorbells_missing_queues,
    attack_message_flood,
    attack_set_irqs_churn,
)
from vfiouser_net_harness.hostile_driver.layout import MSG_REPLY_BOUND
from vfiouser_net_harness.hostile_driver.rings import (
    attack_avail_idx_jump,
    attack_chain_longer_than_ring,
    attack_desc_loops,
    attack_desc_outside_memory,
    attack_desc_straddling_regions,
    attack_head_index_out_of_range,
    attack_rx_ring_starved,
)
from vfiouser_net_harness.hostile_driver.steering import attack_steering_to_unconfigured_pairs
from vfiouser_net_harness.hostile_driver.vfio_messages import (
    attack_region_access_out_of_range,
    attack_region_info_small_argsz,
    attack_set_irqs_overflow,
)

if TYPE_CHECKING:
    from vfiouser_net_harness.hostile_driver.driver import HostileDriver


SECURITY_ENTRIES: list[tuple[Callable[[HostileDriver, AttackRun], None], str, str]] = [
    (
        attack_dma_map_no_access,
        "device",
        "refused (error reply or dma_refused); buffers unused, rings DEVICE_NEEDS_RESET",
    ),
    (
        attack_dma_map_write_only,
        "device",
        "never read: frame not sent, rings DEVICE_NEEDS_RESET; rx refused or in the region",
    ),
    (
        attack_dma_map_beyond_file,
        "device",
        "refused (error reply or dma_refused); no SIGBUS, rings DEVICE_NEEDS_RESET",
    ),
    (
        attack_dma_file_truncated,
        "queue",
        "no SIGBUS: the daemon lives, the pair may break, the other pairs go on",
    ),
    (
        attack_dma_map_unaligned_offset,
        "queue",
        "exactly the frame in the file or nothing; rx in the file or unused",
    ),
    (attack_dma_map_repeated, "queue", "answered, no fd kept, no region added"),
    (attack_set_irqs_overflow, "queue", "error replies, no fd kept, vectors still fire"),
    (attack_region_access_out_of_range, "queue", "error replies, nothing changed"),
    (attack_region_info_small_argsz, "queue", "error replies, nothing changed"),
    (
        attack_ctrl_queue_busy,
        "queue",
        f"messages answered within {MSG_REPLY_BOUND} s, ctrl_budget_exhausted, others go on",
    ),
    (
        attack_steering_to_unconfigured_pairs,
        "device",
        "VIRTIO_NET_ERR or drops.pair_not_ready; heap bounded; pair 0 receives after",
    ),
]
SECURITY_ATTACKS: tuple[str, ...] = tuple(
    fn.__name__.removeprefix("attack_") for fn, _, _ in SECURITY_ENTRIES
)


def _catalogue() -> dict[str, Attack]:
    entries = [
        (
            attack_rx_ring_starved,
            "queue",
            "frames wait (bounded), then drops.steer_backlog; others unaffected",
        ),
        (
            attack_desc_outside_memory,
            "queue",
            "drop: used length 0, errors.desc_addr, drops.bad_chain",
        ),
        (
            attack_desc_straddling_regions,
            "queue",
            "drop: used length 0, errors.desc_addr, drops.bad_chain",
        ),
        (attack_desc_loops, "queue", "drop: used length 0, errors.desc_loop, drops.bad_chain"),
        (
            attack_chain_longer_than_ring,
            "queue",
            "drop: used length 0, errors.desc_loop/chain_too_long/indirect, drops.bad_chain",
        ),
        (attack_avail_idx_jump, "queue", "DEVICE_NEEDS_RESET + config interrupt, queue broken"),
        (
            attack_head_index_out_of_range,
            "queue",
            "DEVICE_NEEDS_RESET + config interrupt, queue broken, drops.queue_broken",
        ),
        (
            attack_ctrl_ring_corrupt,
            "queue",
            "DEVICE_NEEDS_RESET + config interrupt, control queue broken",
        ),
        (attack_ctrl_malformed_commands, "queue", "VIRTIO_NET_ERR, nothing changed"),
        (
            attack_rings_in_unmapped_memory,
            "device",
            "DEVICE_NEEDS_RESET at DRIVER_OK + config interrupt",
        ),
        (attack_dma_unmap_buffers_in_use, "queue", "drop: used length 0, errors.desc_addr"),
        (
            attack_dma_unmap_rings_in_use,
            "queue",
            "DEVICE_NEEDS_RESET + config interrupt, pair broken",
        ),
        (
            attack_dma_unmap_during_steering_drain,
            "queue",
            "DEVICE_NEEDS_RESET, pair broken, no crash; the other pairs go on",
        ),
        (attack_doorbells_missing_queues, "queue", "ignored, doorbells_invalid"),
        (
            attack_doorbells_before_driver_ok,
            "device",
            "ignored, doorbells_invalid (the driver reset the device)",
        ),
        (attack_config_space_writes, "device", "survives; works after a reset by the driver"),
        (attack_bar0_writes, "device", "survives; works after a reset by the driver"),
        (
            attack_set_irqs_churn,
            "queue",
            "no interrupt to a replaced eventfd, irq_errors while disabled",
        ),
        (attack_message_flood, "queue", "keeps serving, bounded memory, doorbells_invalid"),
        *SECURITY_ENTRIES,
    ]
    out = {}
    for fn, scope, reaction in entries:
        name = fn.__name__.removeprefix("attack_")
        doc = " ".join((fn.__doc__ or "").split())
        out[name] = Attack(name, fn, scope, reaction, doc)
    return out


CATALOGUE: dict[str, Attack] = _catalogue()
