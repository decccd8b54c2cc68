"""How doorbells reach the workers: the doorbell polling mode (the notify
area is a shared page the workers poll, `--notify-mode poll`) and the
bounded busy-poll in the default mode (`--busy-poll-us`), through the tests'
own vfio-user client and virtio driver."""

from __future__ import annotations

from collections.abc import Callable

from vfiouser_net_harness.virtio_pci_driver import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_PROMISC,
    bit,
)

from tests.protocol.support import (
    BROADCAST,
    GUEST_FEATURES,
    GUEST_MAC,
    DeviceEnv,
    exchange_tagged,
    open_session,
    tagged_frame,
)

BAR0 = 0
NOTIFY_OFF, NOTIFY_LEN = 0x3000, 0x1000


def test_default_mode_has_nothing_mmappable(env: DeviceEnv) -> None:
    with env.connect() as client:
        info = client.region_info(BAR0)
        try:
            assert not info.mmappable and not info.sparse_areas and not info.fds
        finally:
            info.close_fds()


def test_poll_mode_offers_the_notify_page_only(env_factory: Callable[..., DeviceEnv]) -> None:
    env = env_factory("--notify-mode", "poll")
    with env.connect() as client:
        info = client.region_info(BAR0)
        try:
            assert info.mmappable and len(info.fds) == 1
            assert [(a.offset, a.size) for a in info.sparse_areas] == [(NOTIFY_OFF, NOTIFY_LEN)]
        finally:
            info.close_fds()


def test_poll_mode_moves_traffic_and_control_commands(
    env_factory: Callable[..., DeviceEnv],
) -> None:
    env = env_factory("--notify-mode", "poll")
    # use_mmap: doorbells are stores to the mapped page, as in a QEMU guest.
    s = open_session(env, use_mmap=True)
    try:
        drv = s.driver
        drv.bring_up()  # its control commands go through the polled page too
        assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\1") == 0
        sent = 40
        exchange_tagged(env, drv, "poll", sent)
        assert drv.ctrl_command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0") == 0
    finally:
        s.close()
    q = env.final_counters()["queues"][0]
    assert q["tx"]["packets"] == sent and q["rx"]["packets"] >= sent
    # The worker sets NO_NOTIFY / leaves avail_event behind, so a driver that
    # honours suppression hardly kicks; this one always kicks, and each kick
    # the worker saw in the page is counted (two between looks count once).
    assert 1 <= q["tx"]["doorbells"] <= sent
    # No refusal logged (\b: the counters line has a "dma_refused" key).
    assert env.log_count(r"\brefused\b") == 0


def _kicks_for(env: DeviceEnv, frames: int) -> tuple[int, int]:
    """Send `frames` tx frames one at a time with a driver that kicks only
    when EVENT_IDX says so; returns (device-counted doorbells, packets)."""
    s = open_session(env, features=GUEST_FEATURES | bit(VIRTIO_F_EVENT_IDX), always_kick=False)
    try:
        s.driver.bring_up()
        for i in range(frames):
            s.driver.send_packet(tagged_frame(BROADCAST, b"bp%d" % i, src=GUEST_MAC))
    finally:
        s.close()
    tx = env.final_counters()["queues"][0]["tx"]
    return int(tx["doorbells"]), int(tx["packets"])


def test_busy_poll_saves_doorbells(env_factory: Callable[..., DeviceEnv]) -> None:
    """The driver adds a frame every few hundred microseconds: a worker that
    sleeps at once needs a doorbell for nearly every frame, one that keeps
    looking for 5 ms after work catches the next frame without one."""
    frames = 200
    kicks_off, packets_off = _kicks_for(env_factory("--busy-poll-us", "0"), frames)
    kicks_on, packets_on = _kicks_for(env_factory("--busy-poll-us", "5000"), frames)
    assert packets_off == packets_on == frames
    assert kicks_off >= frames // 2, kicks_off
    assert kicks_on <= kicks_off // 4, (kicks_on, kicks_off)
