"""Device-level benchmark: the device at full speed to and from a TAP, with no
guest, and in the same run the ceiling of the host path alone.

Device runs: the real daemon (in a network namespace, on a TAP) and a
synthetic virtio driver. Python (the test harness) does the control work over
the vfio-user socket: version, guest memory (a memfd) DMA-mapped, features
(VERSION_1, EVENT_IDX, MRG_RXBUF, CTRL_VQ, + MQ with more than one pair; no
checksum or TSO offloads), queues of 256, MSI-X eventfds, DRIVER_OK and
VQ_PAIRS_SET. The hot loop is a C program (csrc/synth_driver.c, one thread
per pair) that inherits the memfd, the socket and the interrupt eventfds and
behaves like Linux's virtio_net with EVENT_IDX: doorbells are posted
REGION_WRITEs sent only when vring_need_event() asks for them, interrupts are
waited for on the eventfds with used_event set as Linux sets it. Python does
not touch the socket while it runs.

- tx (driver -> TAP): the ring kept full of pre-built UDP frames; the TAP
  side's kernel drops them at once (their destination MAC is not the TAP's).
- rx (TAP -> driver): csrc/tap_gen.c sends UDP frames (16 flows) out of the
  TAP from inside the namespace as fast as it can (AF_PACKET,
  PACKET_QDISC_BYPASS, sendmmsg); the device's workers read them.

Ceiling runs: csrc/host_path.c opens the same TAP as the daemon does, one
queue and one thread per pair, and does the same writev()/readv() per frame
with the same sink / generator and no device (the daemon is stopped).

The device's transmit runs twice: ``--tap-io writev`` (one system call a
frame, as the ceiling's loop) and, where the kernel has io_uring,
``--tap-io io_uring`` (a ring pass's frames in one system call): the
"batched" figures, against the same one-syscall ceiling.

Reported per case: packets per second and Gbit/s (Ethernet frame bytes, no
virtio-net header), doorbells and interrupts per packet as the driver saw
them and as the daemon counted them (its Prometheus metrics), device/ceiling
ratio, batched/ceiling for transmit, and the 2-pair/1-pair packet-rate
scaling.

    python bench/device_level.py [--seconds 5] [--quick] [--json out.json]

Everything competes for the same CPUs (the daemon's workers, the driver's
threads, the generator, the kernel's TAP path): compare ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfiouser_net_harness.guest_memory import GuestMemory
from vfiouser_net_harness.netns import NetNS, Tap, netns
from vfiouser_net_harness.server import Server
from vfiouser_net_harness.vfio_user_client import VfioUserClient
from vfiouser_net_harness.virtio_pci_driver import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    SplitQueue,
    VirtioError,
    VirtioNetDriver,
    bit,
)

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench.device_level")

CSRC = Path(__file__).resolve().parent / "csrc"
PROGRAMS = ("synth_driver", "host_path", "tap_gen")
CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread"]

TAP_NAME = "vnbtap0"
NETNS_PREFIX = "vnb"
DEVICE_MAC = "02:76:6e:00:00:01"
PEER_MAC = "02:76:6e:00:00:fe"
# Transmitted frames go to a MAC that is not the TAP's: the namespace's stack
# drops them as soon as they arrive (PACKET_OTHERHOST), so the sink is cheap.
SINK_MAC = "02:76:6e:00:00:99"
QUEUE_SIZE = 256
BUF_STRIDE = 2048  # per descriptor: 12-byte header + frame (tx), receive buffer (rx)
MEM_SIZE = 16 << 20
FLOWS = 16
GEN_THREADS = 1

DIRECTIONS = ("tx", "rx")
FRAME_SIZES = (64, 1500)
PAIRS = (1, 2)

DEFAULT_SECONDS = 5.0
QUICK_SECONDS = 1.0
WARMUP = 0.5
QUICK_WARMUP = 0.2
DRAIN = 2.0

METRIC = "vfiouser_net_queue_{}_total"
DEVICE_COUNTERS = (
    "packets",
    "bytes",
    "kicks",
    "interrupts",
    "notifications_suppressed",
    "ring_full",
    "steered",
    "drops",
)


@dataclass(frozen=True)
class Case:
    direction: str
    frame_bytes: int
    pairs: int

    def __str__(self) -> str:
        return f"{self.direction} {self.frame_bytes} B {self.pairs} pair(s)"


ALL_CASES: tuple[Case, ...] = tuple(
    Case(d, f, p) for d in DIRECTIONS for f in FRAME_SIZES for p in PAIRS
)


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# Building the C programs
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("VN_CACHE", "/var/cache/vfiouser-net")) / "bench-bin"


def build_programs(out_dir: Path | None = None) -> dict[str, Path]:
    """Compile csrc/*.c into the cache (again when a source is newer)."""
    out = cache_dir() if out_dir is None else out_dir
    out.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise BenchError(f"no C compiler ({cc}) to build the benchmark programs")
    headers = list(CSRC.glob("*.h"))
    paths = {}
    for name in PROGRAMS:
        src = CSRC / f"{name}.c"
        binary = out / name
        newest = max(p.stat().st_mtime for p in [src, *headers])
        if not binary.exists() or binary.stat().st_mtime < newest:
            tmp = out / f".{name}.{os.getpid()}"
            argv = [cc, *CFLAGS, "-I", str(CSRC), "-o", str(tmp), str(src)]
            log.info("building %s", name)
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise BenchError(f"{' '.join(argv)} failed:\n{proc.stderr}")
            tmp.replace(binary)
        paths[name] = binary
    return paths


# --------------------------------------------------------------------------
# The daemon's counters
# --------------------------------------------------------------------------


_FETCH = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
)


def scrape(ns: NetNS, url: str) -> dict[str, float]:
    """Counters of the queues, summed over pairs: {"<direction>_<name>": value},
    plus "pairs_active". The daemon listens inside the namespace: fetched
    from there."""
    from prometheus_client.parser import text_string_to_metric_families

    text = ns.run([sys.executable, "-c", _FETCH, url], timeout=30).stdout
    wanted = {METRIC.format(n): n for n in DEVICE_COUNTERS}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in wanted:
                key = f"{s.labels.get('direction')}_{wanted[s.name]}"
                out[key] = out.get(key, 0.0) + s.value
                pair_key = f"{key}@{s.labels.get('queue')}"  # per pair as well
                out[pair_key] = out.get(pair_key, 0.0) + s.value
                if "reason" in s.labels:  # drops by reason as well
                    key = f"{key}_{s.labels['reason']}"
                    out[key] = out.get(key, 0.0) + s.value
            elif s.name == "vfiouser_net_device_queue_pairs_active":
                out["pairs_active"] = s.value
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if k != "pairs_active"}


def per(a: float, b: float) -> float:
    return a / b if b else math.nan


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def _parse_json_line(out: str, what: str) -> dict[str, Any]:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise BenchError(f"{what} printed no result:\n{out[-2000:]}")


@contextlib.contextmanager
def generator(
    ns: NetNS, progs: dict[str, Path], frame_bytes: int, seconds: float
) -> Iterator[dict[str, Any]]:
    """tap_gen sending towards the TAP's readers for at most ``seconds``;
    stopped on the way out; its result lands in the yielded dict."""
    argv = [
        str(progs["tap_gen"]),
        "--ifname",
        TAP_NAME,
        "--frame-bytes",
        str(frame_bytes),
        "--seconds",
        f"{seconds:.3f}",
        "--dst-mac",
        DEVICE_MAC,
        "--src-mac",
        PEER_MAC,
        "--flows",
        str(FLOWS),
        "--threads",
        str(GEN_THREADS),
    ]
    proc = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    result: dict[str, Any] = {}
    try:
        time.sleep(0.05)
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise BenchError(f"tap_gen exited {proc.returncode}: {err.strip()}")
        yield result
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        if err.strip():
            log.debug("tap_gen: %s", err.strip())
        with contextlib.suppress(BenchError, json.JSONDecodeError):
            result.update(_parse_json_line(out, "tap_gen"))
        if result.get("error"):
            log.warning("tap_gen: %s", result["error"])


# --------------------------------------------------------------------------
# Device runs
# --------------------------------------------------------------------------


def driver_features(pairs: int) -> int:
    f = (
        bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_F_EVENT_IDX)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CTRL_VQ)
    )
    if pairs > 1:
        f |= bit(VIRTIO_NET_F_MQ)
    return f


def _queue_arg(drv: VirtioNetDriver, q: SplitQueue, buf: int) -> tuple[str, int, int]:
    """synth_driver's --queue value, the queue's BAR and its eventfd."""
    bar, notify = drv.transport.queue_notify_addr[q.index]
    irq_fd = drv.transport.irq_fds[q.vector]
    arg = ":".join(
        str(v)
        for v in (
            q.index,
            q.size,
            q.desc_addr,
            q.avail_addr,
            q.used_addr,
            notify,
            irq_fd,
            buf,
            BUF_STRIDE,
        )
    )
    return arg, bar, irq_fd


def device_run(
    case: Case,
    server: Server,
    ns: NetNS,
    progs: dict[str, Path],
    seconds: float,
    warmup: float,
) -> dict[str, Any]:
    """One run of the synthetic driver against the daemon; raw results."""
    url = server.metrics_url()
    client = VfioUserClient(server.socket_path, timeout=10)
    mem = GuestMemory(MEM_SIZE, name="bench-guest-ram")
    drv: VirtioNetDriver | None = None
    try:
        client.negotiate()
        mem.map_into(client)
        drv = VirtioNetDriver(
            client,
            mem,
            features=driver_features(case.pairs),
            queue_size=QUEUE_SIZE,
            rx_buf_size=64,  # the harness's own pools stay unused
            tx_block_size=64,
            auto_refill=False,
        )
        drv.bring_up(pairs=case.pairs, rx_buffers=0)
        if len(drv.pairs) != case.pairs:
            raise BenchError(f"{len(drv.pairs)} pairs set up, wanted {case.pairs}")
        queue_args: list[str] = []
        fds = [client.fileno(), mem.fd]
        bars = set()
        for qp in drv.pairs:
            q = qp.tx if case.direction == "tx" else qp.rx
            if q.vector == 0xFFFF:
                raise BenchError(f"queue {q.index} has no MSI-X vector")
            buf = mem.alloc(q.size * BUF_STRIDE, 4096)
            arg, bar, irq_fd = _queue_arg(drv, q, buf)
            queue_args += ["--queue", arg]
            fds.append(irq_fd)
            bars.add(bar)
        if len(bars) != 1:
            raise BenchError(f"notify areas in several BARs: {bars}")
        before = scrape(ns, url)
        if before.get("pairs_active") != case.pairs:
            raise BenchError(
                f"the device has {before.get('pairs_active')} pairs active, wanted {case.pairs}"
            )
        argv = [
            str(progs["synth_driver"]),
            "--sock-fd",
            str(client.fileno()),
            "--mem-fd",
            str(mem.fd),
            "--mem-size",
            str(mem.size),
            "--mem-base",
            str(mem.base),
            "--region",
            str(bars.pop()),
            "--direction",
            case.direction,
            "--frame-bytes",
            str(case.frame_bytes),
            "--seconds",
            f"{seconds:.3f}",
            "--warmup",
            f"{warmup:.3f}",
            "--drain",
            f"{DRAIN:.3f}",
            "--flows",
            str(FLOWS),
            "--dst-mac",
            SINK_MAC,
            "--src-mac",
            DEVICE_MAC,
            *queue_args,
        ]
        timeout = warmup + seconds + DRAIN + 30
        gen_result: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            if case.direction == "rx":
                gen_result = stack.enter_context(
                    generator(ns, progs, case.frame_bytes, warmup + seconds + DRAIN + 5)
                )
            # The driver owns the socket from here until it exits.
            proc = subprocess.run(
                argv, pass_fds=fds, capture_output=True, text=True, timeout=timeout, check=False
            )
        if proc.stderr.strip():
            log.info("synth_driver: %s", proc.stderr.strip()[-2000:])
        if proc.returncode != 0:
            raise BenchError(
                f"synth_driver exited {proc.returncode}: {proc.stderr.strip()[-2000:]}\n"
                f"{proc.stdout.strip()[-2000:]}"
            )
        result = _parse_json_line(proc.stdout, "synth_driver")
        # Every doorbell the driver posted has been handled once this round
        # trip returns: the counters below include them all.
        client.sync()
        after = scrape(ns, url)
        errors = [q["error"] for q in result["per_queue"] if q["error"]]
        if errors:
            log.warning("%s: %s", case, "; ".join(errors))
        if not server.alive():
            raise BenchError(f"the daemon died:\n{server.log()[-3000:]}")
        return {
            "driver": result,
            "device": delta(before, after),
            "generator": gen_result,
        }
    finally:
        if drv is not None:
            try:
                drv.shutdown()
            except Exception as e:  # the connection may be gone: cleanup goes on
                log.warning("%s: device shutdown: %s", case, e)
        client.close()
        mem.close()


# --------------------------------------------------------------------------
# Ceiling runs
# --------------------------------------------------------------------------


def ceiling_run(
    case: Case, ns: NetNS, progs: dict[str, Path], seconds: float, warmup: float
) -> dict[str, Any]:
    argv = [
        str(progs["host_path"]),
        "--tap",
        TAP_NAME,
        "--queues",
        str(case.pairs),
        "--direction",
        case.direction,
        "--frame-bytes",
        str(case.frame_bytes),
        "--seconds",
        f"{seconds:.3f}",
        "--warmup",
        f"{warmup:.3f}",
        "--flows",
        str(FLOWS),
        "--dst-mac",
        SINK_MAC,
        "--src-mac",
        DEVICE_MAC,
    ]
    gen_result: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if case.direction == "rx":
            gen_result = stack.enter_context(
                generator(ns, progs, case.frame_bytes, warmup + seconds + 5)
            )
        proc = ns.run(argv, timeout=warmup + seconds + 30, check=False)
    if proc.returncode != 0:
        raise BenchError(
            f"host_path exited {proc.returncode}: {proc.stderr.strip()[-2000:]}\n"
            f"{proc.stdout.strip()[-2000:]}"
        )
    result = _parse_json_line(proc.stdout, "host_path")
    return {"host": result, "generator": gen_result}


# --------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def check_prerequisites() -> None:
    """Raise BenchError naming what is missing."""
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, TAP devices)")
    if not Path("/dev/net/tun").exists():
        raise BenchError("/dev/net/tun missing")
    if shutil.which("ip") is None:
        raise BenchError("ip (iproute2) not installed")
    try:
        import vfiouser_net.native  # noqa: F401
    except Exception as e:
        raise BenchError(f"vfiouser_net not importable by {sys.executable}: {e}") from e


def _setup_netns(ns: NetNS) -> None:
    # Nothing of the namespace's own on the TAP: no IPv6 (router
    # solicitations, MLD).
    for conf in ("all", "default"):
        ns.run(["sysctl", "-qw", f"net.ipv6.conf.{conf}.disable_ipv6=1"], check=False)


@contextlib.contextmanager
def fresh_tap(ns: NetNS, pairs: int) -> Iterator[Tap]:
    """A new TAP for each run, deleted afterwards. What one user leaves on a
    TAP outlives it: the daemon attaches a queue-steering eBPF program, which
    would otherwise choose the queues of the ceiling run after it."""
    with ns.tap(TAP_NAME, multi_queue=pairs > 1, address=None) as tap:
        yield tap


@contextlib.contextmanager
def tap_counters(tap: Tap) -> Iterator[dict[str, int]]:
    """The TAP's kernel counters over the block (its tx side carries frames
    towards the queue readers: tx_dropped counts frames no reader took in
    time; its rx side carries what the writers sent into the namespace)."""
    before = tap.stats()
    out: dict[str, int] = {}
    yield out
    after = tap.stats()
    keys = ("tx_packets", "tx_dropped", "rx_packets", "rx_dropped")
    out.update({k: after.get(k, 0) - before.get(k, 0) for k in keys})


def _device_side(
    case: Case,
    ns: NetNS,
    workdir: Path,
    progs: dict[str, Path],
    seconds: float,
    warmup: float,
    daemon_args: Sequence[str] = (),
) -> dict[str, Any]:
    """A daemon (and a TAP) of its own for one device run, stopped afterwards
    (it holds the TAP's queues)."""
    server = Server(
        workdir / "dev.sock",
        TAP_NAME,
        netns=ns.name,
        extra_args=[
            "--queue-pairs",
            str(case.pairs),
            "--mac",
            DEVICE_MAC,
            "--queue-size",
            str(QUEUE_SIZE),
            *daemon_args,
        ],
    )
    ok = False
    with fresh_tap(ns, case.pairs) as tap:
        try:
            server.start()
            with tap_counters(tap) as tap_dev:
                result = device_run(case, server, ns, progs, seconds, warmup)
            result["tap"] = tap_dev
            ok = True
        finally:
            rc = server.stop()  # before its TAP goes
            if not ok or rc != 0:
                log.error("daemon exited %s; log:\n%s", rc, server.log()[-4000:])
            with contextlib.suppress(OSError):
                server.log_path.unlink()
    if rc != 0:
        raise BenchError(f"the daemon exited {rc} on SIGTERM")
    return result


def measure(
    cases: Sequence[Case],
    seconds: float,
    warmup: float,
    progs: dict[str, Path],
    daemon_args: Sequence[str] = (),
) -> dict[Case, dict[str, Any]]:
    """Device and ceiling runs for ``cases``; raw results by case.

    Each case's ceiling run follows its device run at once, so that both see
    the machine in the same state (other load comes and goes)."""
    raw: dict[Case, dict[str, Any]] = {}
    for pairs in sorted({c.pairs for c in cases}):
        workdir = Path(tempfile.mkdtemp(prefix="vnb-"))
        try:
            with netns(NETNS_PREFIX) as ns:
                _setup_netns(ns)
                for case in (c for c in cases if c.pairs == pairs):
                    log.info("device run: %s", case)
                    # Transmit one writev a frame, like the ceiling's loop;
                    # then batched through io_uring where the kernel has it.
                    one = ["--tap-io", "writev"] if case.direction == "tx" else []
                    dev = _device_side(
                        case, ns, workdir, progs, seconds, warmup, [*daemon_args, *one]
                    )
                    _log_device(case, dev)
                    entry: dict[str, Any] = {"device": dev}
                    if case.direction == "tx" and batching_available():
                        log.info("device run, batched (io_uring): %s", case)
                        entry["batched"] = _device_side(
                            case, ns, workdir, progs, seconds, warmup,
                            [*daemon_args, "--tap-io", "io_uring"],
                        )  # fmt: skip
                        _log_device(case, entry["batched"])
                    log.info("ceiling run: %s", case)
                    with fresh_tap(ns, case.pairs) as tap, tap_counters(tap) as tap_ceil:
                        ceiling = ceiling_run(case, ns, progs, seconds, warmup)
                    ceiling["tap"] = tap_ceil
                    _log_ceiling(case, ceiling)
                    raw[case] = {**entry, "ceiling": ceiling}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return raw


def batching_available() -> bool:
    """Whether the daemon can batch TAP writes through io_uring here."""
    from vfiouser_net.native import lib

    return bool(lib.vn_tap_batch_probe() == 0)


def tap_drop_fraction(case: Case, tap: dict[str, int]) -> float:
    """Share of the frames the TAP dropped on the path measured: towards the
    queue readers (rx: they did not keep up with the generator) or from the
    writers into the namespace (tx)."""
    side = "tx" if case.direction == "rx" else "rx"
    passed, dropped = tap.get(f"{side}_packets", 0), tap.get(f"{side}_dropped", 0)
    return per(dropped, passed + dropped)


def _nonzero_drops(dev: dict[str, float], direction: str) -> str:
    prefix = f"{direction}_drops_"
    parts = [
        f"{k.removeprefix(prefix)} {v:.0f}" for k, v in dev.items() if k.startswith(prefix) and v
    ]
    return ", ".join(parts) or "none"


def _log_device(case: Case, r: dict[str, Any]) -> None:
    d, dev, gen, tap = r["driver"], r["device"], r["generator"], r["tap"]
    w, k = d["window"], case.direction
    log.info(
        "%s: device %.0f pps; driver window %d pkts, %d doorbells, %d interrupts, "
        "%d idle waits (%d with an interrupt owed); totals driver %d / device %d pkts; "
        "device kicks %d irqs %d suppressed %d ring_full %d steered %d; "
        "device drops: %s; TAP drop %.1f %%; per pair: packets %s, steered out %s%s",
        case,
        d["pps"],
        w["packets"],
        w["doorbells"],
        w["interrupts"],
        w["idle_timeouts"],
        d["total"]["missed_interrupts"],
        d["total"]["packets"],
        dev.get(f"{k}_packets", 0),
        dev.get(f"{k}_kicks", 0),
        dev.get(f"{k}_interrupts", 0),
        dev.get(f"{k}_notifications_suppressed", 0),
        dev.get(f"{k}_ring_full", 0),
        dev.get(f"{k}_steered", 0),
        _nonzero_drops(dev, k),
        100 * tap_drop_fraction(case, tap),
        _per_pair(dev, f"{k}_packets", case.pairs),
        _per_pair(dev, f"{k}_steered", case.pairs),
        f"; generator sent {gen.get('sent', 0)}" if gen else "",
    )


def _per_pair(dev: dict[str, float], key: str, pairs: int) -> str:
    return "/".join(f"{dev.get(f'{key}@{p}', 0.0):.0f}" for p in range(pairs))


def _log_ceiling(case: Case, r: dict[str, Any]) -> None:
    h, gen, tap = r["host"], r["generator"], r["tap"]
    log.info(
        "%s: ceiling %.0f pps (%d errors, %d polls); TAP drop %.1f %%; per queue: packets %s%s",
        case,
        h["pps"],
        h["errors"],
        h["polls"],
        100 * tap_drop_fraction(case, tap),
        "/".join(str(q["packets"]) for q in h["per_queue"]),
        f"; generator sent {gen.get('sent', 0)}" if gen else "",
    )


def summarize(raw: dict[Case, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The published schema from the raw results."""
    rows = []
    for case, r in raw.items():
        d, dev = r["device"]["driver"], r["device"]["device"]
        w = d["window"]
        direction = case.direction
        pps = float(d["pps"])
        c_pps = float(r["ceiling"]["host"]["pps"])
        rows.append(
            {
                "direction": direction,
                "frame_bytes": case.frame_bytes,
                "pairs": case.pairs,
                "device": {
                    "pps": pps,
                    "gbps": pps * case.frame_bytes * 8 / 1e9,
                    "doorbells_per_packet": per(w["doorbells"], w["packets"]),
                    "interrupts_per_packet": per(w["interrupts"], w["packets"]),
                    "device_kicks_per_packet": per(
                        dev.get(f"{direction}_kicks", 0.0), dev.get(f"{direction}_packets", 0.0)
                    ),
                    "device_interrupts_per_packet": per(
                        dev.get(f"{direction}_interrupts", 0.0),
                        dev.get(f"{direction}_packets", 0.0),
                    ),
                },
                "ceiling": {"pps": c_pps, "gbps": c_pps * case.frame_bytes * 8 / 1e9},
                "ratio": per(pps, c_pps),
            }
        )
        if "batched" in r:
            b_pps = float(r["batched"]["driver"]["pps"])
            rows[-1]["batched"] = {
                "pps": b_pps,
                "gbps": b_pps * case.frame_bytes * 8 / 1e9,
                "ratio": per(b_pps, c_pps),
            }
    scaling = {}
    for direction in DIRECTIONS:
        for size in FRAME_SIZES:
            one = raw.get(Case(direction, size, 1))
            two = raw.get(Case(direction, size, 2))
            scaling[f"{direction}_{size}"] = (
                per(two["device"]["driver"]["pps"], one["device"]["driver"]["pps"])
                if one and two
                else math.nan
            )
    return {"machine": machine(), "seconds": float(seconds), "rows": rows, "scaling": scaling}


def run(
    seconds: float = DEFAULT_SECONDS,
    quick: bool = False,
    cases: Sequence[Case] | None = None,
    raw_out: dict[Case, dict[str, Any]] | None = None,
    daemon_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the benchmark; returns the published schema (see the module doc).

    ``quick``: about one second per run (CI smoke). ``cases`` restricts the
    runs (default: tx/rx x 64/1500 B x 1/2 pairs). ``raw_out``, if given,
    receives every run's raw results (driver, daemon counters, generator,
    ceiling) by case. A scaling figure whose two cases were not run is NaN;
    so is a per-packet figure of a run that moved no packet.
    ``daemon_args``: extra ``vfiouser-net serve`` options for the device
    runs (e.g. ``--busy-poll-us 0``).
    """
    if quick:
        seconds = min(seconds, QUICK_SECONDS)
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    warmup = QUICK_WARMUP if quick else WARMUP
    check_prerequisites()
    progs = build_programs()
    chosen = list(ALL_CASES if cases is None else cases)
    load = os.getloadavg()[0]
    if load > 0.5:
        log.warning(
            "load average %.2f before the benchmark: other work shares the CPUs, "
            "the figures are contended",
            load,
        )
    t0 = time.monotonic()
    if daemon_args:
        log.info("daemon options: %s", " ".join(daemon_args))
    raw = measure(chosen, seconds, warmup, progs, daemon_args)
    log.info(
        "%d cases in %.1f s (load average %.2f)",
        len(chosen),
        time.monotonic() - t0,
        os.getloadavg()[0],
    )
    ordered = {c: raw[c] for c in chosen}
    if raw_out is not None:
        raw_out.update(ordered)
    return summarize(ordered, seconds)


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _f(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def markdown(result: dict[str, Any], raw: dict[Case, dict[str, Any]] | None = None) -> str:
    head = [
        "direction",
        "frame B",
        "pairs",
        "device kpps",
        "device Gbit/s",
        "doorbells/pkt",
        "irqs/pkt",
        "dev kicks/pkt",
        "dev irqs/pkt",
        "ceiling kpps",
        "ceiling Gbit/s",
        "device/ceiling",
        "batched kpps",
        "batched/ceiling",
    ]
    lines = [
        f"Device level, {result['seconds']:g} s per run; {result['machine']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in result["rows"]:
        d, c = r["device"], r["ceiling"]
        cells = [
            r["direction"],
            str(r["frame_bytes"]),
            str(r["pairs"]),
            _f(d["pps"] / 1e3, 0),
            _f(d["gbps"], 3),
            _f(d["doorbells_per_packet"], 4),
            _f(d["interrupts_per_packet"], 4),
            _f(d["device_kicks_per_packet"], 4),
            _f(d["device_interrupts_per_packet"], 4),
            _f(c["pps"] / 1e3, 0),
            _f(c["gbps"], 3),
            _f(r["ratio"], 2),
            _f(r["batched"]["pps"] / 1e3, 0) if "batched" in r else "-",
            _f(r["batched"]["ratio"], 2) if "batched" in r else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ceiling = {
        (r["direction"], r["frame_bytes"], r["pairs"]): r["ceiling"]["pps"] for r in result["rows"]
    }
    lines += ["", "2-pair / 1-pair packet rate, device (host path alone):"]
    for key, value in result["scaling"].items():
        direction, size = key.split("_")
        one = ceiling.get((direction, int(size), 1), math.nan)
        two = ceiling.get((direction, int(size), 2), math.nan)
        lines.append(f"- {key}: {_f(value)} ({_f(per(two, one))})")
    if raw:
        lines += ["", *_details(raw)]
    return "\n".join(lines)


def _details(raw: dict[Case, dict[str, Any]]) -> list[str]:
    """Where the frames went: TAP drops tell whether the readers kept up
    (rx: none means the generator, not the reader, set the pace)."""
    head = [
        "direction",
        "frame B",
        "pairs",
        "TAP drop % (device)",
        "TAP drop % (ceiling)",
        "device drops/pkt",
        "cross-steered %",
        "driver pkts",
        "device pkts",
        "idle waits / owed irq",
    ]
    lines = [
        "Host side of each run (TAP drop: frames the TAP dropped because its reader was "
        "behind, rx, or on the way into the namespace, tx):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for case, r in raw.items():
        dev = r["device"]["device"]
        k = case.direction
        pkts = dev.get(f"{k}_packets", 0.0)
        cells = [
            k,
            str(case.frame_bytes),
            str(case.pairs),
            _f(100 * tap_drop_fraction(case, r["device"]["tap"]), 1),
            _f(100 * tap_drop_fraction(case, r["ceiling"]["tap"]), 1),
            _f(per(dev.get(f"{k}_drops", 0.0), pkts), 4),
            _f(100 * per(dev.get(f"{k}_steered", 0.0), pkts), 1) if k == "rx" else "-",
            str(r["device"]["driver"]["total"]["packets"]),
            f"{pkts:.0f}",
            f"{r['device']['driver']['total']['idle_timeouts']} / "
            f"{r['device']['driver']['total']['missed_interrupts']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="per run")
    parser.add_argument("--quick", action="store_true", help="about 1 s per run (CI smoke)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--daemon-args", default="", help="extra 'vfiouser-net serve' options (one string)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    raw: dict[Case, dict[str, Any]] = {}
    try:
        result = run(
            args.seconds, args.quick, raw_out=raw, daemon_args=shlex.split(args.daemon_args)
        )
    except (BenchError, VirtioError) as e:
        log.error("%s", e)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log.info("results written to %s", args.json)
    print(markdown(result, raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
