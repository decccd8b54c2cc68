"""A tiny in-process vfio-user server emulating a modern virtio-net device.

Only for testing the test-side driver (harness/vfiouser_net_harness/virtio_pci_driver.py)
without the real device: written independently from the spec, single-threaded,
slow, and loopback-only (every transmitted frame is recorded and, with
``loopback``, delivered back on the rx queue of the same pair).

Layout (deliberately not QEMU's, to prove the driver discovers it):
BAR2 = 0x4000 bytes: ISR @0x0, common @0x1000, device cfg @0x2000,
notify @0x3000 (multiplier ``notify_mult``); MSI-X table/PBA in BAR0.
"""

from __future__ import annotations

import array
import errno
import logging
import mmap
import os
import queue
import select
import socket
import struct
import threading
from dataclasses import dataclass, field

from vfiouser_net_harness import vfio_user_client as vu
from vfiouser_net_harness import virtio_pci_driver as vp

log = logging.getLogger(__name__)

VIRTIO_BAR = 2
MSIX_BAR = 0
BAR_SIZES = {MSIX_BAR: 0x1000, VIRTIO_BAR: 0x4000}
ISR_OFF, COMMON_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0, 0x1000, 0x2000, 0x3000


@dataclass
class FakeQueue:
    size: int
    max_size: int
    msix: int = vp.VIRTIO_MSI_NO_VECTOR
    enable: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    last_avail: int = 0
    used_idx: int = 0


@dataclass
class FakeState:
    status: int = 0
    dfselect: int = 0
    gfselect: int = 0
    driver_features: int = 0
    msix_config: int = vp.VIRTIO_MSI_NO_VECTOR
    queue_select: int = 0
    generation: int = 0
    isr: int = 0
    queues: list[FakeQueue] = field(default_factory=list)


class FakeVirtioNet(threading.Thread):
    def __init__(
        self,
        path: str,
        *,
        pairs: int = 1,
        queue_max: int = 256,
        features: int | None = None,
        msix_vectors: int = 8,
        notify_mult: int = 4,
        mac: bytes = b"\x52\x54\x00\x12\x34\x56",
        mtu: int = 1500,
        loopback: bool = True,
        mmap_notify: bool = False,
    ) -> None:
        super().__init__(daemon=True, name="fake-virtio-net")
        self.path = path
        # mmap_notify: the notify page is offered as a sparse mmap area backed
        # by a memfd; doorbell writes then never reach us, so we poll the
        # avail rings of all enabled queues instead (a polling device).
        self.mmap_notify = mmap_notify
        self.notify_fd = -1
        if mmap_notify:
            self.notify_fd = os.memfd_create("fake-notify", os.MFD_CLOEXEC)
            os.ftruncate(self.notify_fd, BAR_SIZES[VIRTIO_BAR])
        self._reply_fds: list[int] = []
        self.pairs = pairs
        self.queue_max = queue_max
        self.features = (
            features
            if features is not None
            else (
                vp.DEFAULT_NET_FEATURES
                | vp.bit(vp.VIRTIO_NET_F_CTRL_RX)
                | vp.bit(vp.VIRTIO_NET_F_CSUM)
            )
        )
        self.msix_vectors = msix_vectors
        self.notify_mult = notify_mult
        self.mac = mac
        self.mtu = mtu
        self.loopback = loopback
        self.nq = 2 * pairs + 1
        self.st = FakeState()
        self._reset_queues()
        self.cfg = self._build_config_space()
        self.dma: list[tuple[int, int, mmap.mmap]] = []
        self.irq_fds: list[int] = [-1] * msix_vectors
        self.tx_frames: list[tuple[int, bytes, bytes]] = []  # (pair, hdr, frame)
        self.ctrl_log: list[tuple[int, int, bytes]] = []
        self.pending_rx: list[list[tuple[bytes, bytes]]] = [[] for _ in range(pairs)]
        self.curr_pairs = 1
        self.corrupt_next_used_id: int | None = None
        self.kicks: dict[int, int] = {}
        self.inject_q: queue.Queue[tuple[int, bytes, bytes]] = queue.Queue()
        self._stop_r, self._stop_w = os.pipe()
        self.errors: list[BaseException] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)

    # -- config space ------------------------------------------------------------

    def _build_config_space(self) -> bytearray:
        c = bytearray(256)
        struct.pack_into("<HH", c, 0, vp.VIRTIO_PCI_VENDOR_ID, 0x1041)
        struct.pack_into("<H", c, vp.PCI_STATUS, vp.PCI_STATUS_CAP_LIST)
        c[vp.PCI_REVISION_ID] = 1
        c[0x09:0x0C] = bytes([0, 0, 2])  # class: network controller
        struct.pack_into("<HH", c, 0x2C, vp.VIRTIO_PCI_VENDOR_ID, 0x1100)
        # Capability chain in a scrambled order: 0x40 device -> 0x80 msix ->
        # 0x60 common -> 0x90 notify -> 0x70 isr
        c[vp.PCI_CAPABILITY_LIST] = 0x40

        def vcap(off: int, nxt: int, cfg_type: int, offset: int, length: int, ln: int = 16) -> None:
            struct.pack_into(
                "<BBBBBBxxII", c, off, 0x09, nxt, ln, cfg_type, VIRTIO_BAR, 0, offset, length
            )

        vcap(0x40, 0x80, vp.CfgType.DEVICE, DEVICE_OFF, 0x20)
        struct.pack_into(
            "<BBHII", c, 0x80, vp.PCI_CAP_ID_MSIX, 0x60, self.msix_vectors - 1, MSIX_BAR, 0x800
        )
        vcap(0x60, 0x90, vp.CfgType.COMMON, COMMON_OFF, 0x40)
        vcap(0x90, 0x70, vp.CfgType.NOTIFY, NOTIFY_OFF, self.nq * self.notify_mult or 2, 20)
        struct.pack_into("<I", c, 0x90 + 16, self.notify_mult)
        vcap(0x70, 0x00, vp.CfgType.ISR, ISR_OFF, 1)
        return c

    def _device_cfg(self) -> bytes:
        d = bytearray(0x20)
        d[0:6] = self.mac
        struct.pack_into("<HHH", d, 6, vp.VIRTIO_NET_S_LINK_UP, self.pairs, self.mtu)
        struct.pack_into("<IB", d, 12, 10000, 1)
        return bytes(d)

    def _reset_queues(self) -> None:
        self.st = FakeState(
            queues=[FakeQueue(self.queue_max, self.queue_max) for _ in range(self.nq)]
        )

    # -- common cfg ------------------------------------------------------------------

    def _common_image(self) -> bytes:
        st = self.st
        q = st.queues[st.queue_select] if st.queue_select < self.nq else FakeQueue(0, 0)
        df = (self.features >> (32 * st.dfselect)) & 0xFFFFFFFF if st.dfselect < 2 else 0
        gf = (st.driver_features >> (32 * st.gfselect)) & 0xFFFFFFFF if st.gfselect < 2 else 0
        return struct.pack(
            "<IIIIHHBBHHHHHQQQ",
            st.dfselect,
            df,
            st.gfselect,
            gf,
            st.msix_config,
            self.nq,
            st.status,
            st.generation,
            st.queue_select,
            q.size,
            q.msix,
            q.enable,
            st.queue_select,  # queue_notify_off = index
            q.desc,
            q.avail,
            q.used,
        ).ljust(0x40, b"\0")

    def _common_write(self, off: int, data: bytes) -> None:
        st = self.st
        v = int.from_bytes(data, "little")
        q = st.queues[st.queue_select] if st.queue_select < self.nq else None

        def set64(cur: int, base: int) -> int:
            if off == base and len(data) == 8:
                return v
            if off == base and len(data) == 4:
                return (cur & ~0xFFFFFFFF) | v
            if off == base + 4 and len(data) == 4:
                return (cur & 0xFFFFFFFF) | (v << 32)
            raise ValueError(f"bad 64-bit field access {off:#x}/{len(data)}")

        if off == vp.COMMON_DFSELECT:
            st.dfselect = v
        elif off == vp.COMMON_GFSELECT:
            st.gfselect = v
        elif off == vp.COMMON_GF:
            if st.gfselect < 2:
                mask = 0xFFFFFFFF << (32 * st.gfselect)
                st.driver_features = (st.driver_features & ~mask) | (v << (32 * st.gfselect))
        elif off == vp.COMMON_MSIX:
            st.msix_config = v if v < self.msix_vectors else vp.VIRTIO_MSI_NO_VECTOR
        elif off == vp.COMMON_STATUS:
            if v == 0:
                self._reset_queues()
                return
            if (
                v & vp.STATUS_FEATURES_OK
                and not st.status & vp.STATUS_FEATURES_OK
                and st.driver_features & ~self.features
            ):
                v &= ~vp.STATUS_FEATURES_OK
            st.status = v
        elif off == vp.COMMON_Q_SELECT:
            st.queue_select = v
        elif q is None:
            return
        elif off == vp.COMMON_Q_SIZE:
            if v and v <= q.max_size and not v & (v - 1):
                q.size = v
        elif off == vp.COMMON_Q_MSIX:
            q.msix = v if v < self.msix_vectors else vp.VIRTIO_MSI_NO_VECTOR
        elif off == vp.COMMON_Q_ENABLE:
            q.enable = v & 1
        elif off in (vp.COMMON_Q_DESCLO, vp.COMMON_Q_DESCHI):
            q.desc = set64(q.desc, vp.COMMON_Q_DESCLO)
        elif off in (vp.COMMON_Q_AVAILLO, vp.COMMON_Q_AVAILHI):
            q.avail = set64(q.avail, vp.COMMON_Q_AVAILLO)
        elif off in (vp.COMMON_Q_USEDLO, vp.COMMON_Q_USEDHI):
            q.used = set64(q.used, vp.COMMON_Q_USEDLO)

    # -- guest memory --------------------------------------------------------------------

    def _mem(self, addr: int, n: int) -> tuple[mmap.mmap, int]:
        for iova, size, m in self.dma:
            if iova <= addr and addr + n <= iova + size:
                return m, addr - iova
        raise ValueError(f"DMA to unmapped {addr:#x}+{n}")

    def rd(self, addr: int, n: int) -> bytes:
        m, o = self._mem(addr, n)
        return m[o : o + n]

    def wr(self, addr: int, data: bytes) -> None:
        m, o = self._mem(addr, len(data))
        m[o : o + len(data)] = data

    def rd16(self, addr: int) -> int:
        return int.from_bytes(self.rd(addr, 2), "little")

    # -- virtqueue processing -----------------------------------------------------------

    def _has(self, b: int) -> bool:
        return bool(self.st.driver_features & vp.bit(b))

    def _pop_avail(self, q: FakeQueue) -> int | None:
        idx = self.rd16(q.avail + 2)
        if idx == q.last_avail:
            return None
        head = self.rd16(q.avail + 4 + 2 * (q.last_avail % q.size))
        q.last_avail = (q.last_avail + 1) & 0xFFFF
        if self._has(vp.VIRTIO_F_EVENT_IDX):
            self.wr(q.used + 4 + 8 * q.size, struct.pack("<H", q.last_avail))
        return head

    def _chain(self, q: FakeQueue, head: int) -> list[tuple[int, int, bool]]:
        out: list[tuple[int, int, bool]] = []
        table, tsize, i = q.desc, q.size, head
        for _ in range(4 * q.size):
            addr, ln, flags, nxt = vp.DESC.unpack(self.rd(table + 16 * i, 16))
            if flags & vp.VRING_DESC_F_INDIRECT:
                table, tsize, i = addr, ln // 16, 0
                continue
            out.append((addr, ln, bool(flags & vp.VRING_DESC_F_WRITE)))
            if not flags & vp.VRING_DESC_F_NEXT:
                return out
            i = nxt
            if i >= tsize:
                raise ValueError("descriptor next out of range")
        raise ValueError("descriptor loop")

    def _push_used(self, qi: int, q: FakeQueue, head: int, ln: int) -> None:
        uid = head
        if self.corrupt_next_used_id is not None:
            uid, self.corrupt_next_used_id = self.corrupt_next_used_id, None
        self.wr(q.used + 4 + 8 * (q.used_idx % q.size), struct.pack("<II", uid, ln))
        old = q.used_idx
        q.used_idx = (q.used_idx + 1) & 0xFFFF
        self.wr(q.used + 2, struct.pack("<H", q.used_idx))
        self._interrupt(q, old, q.used_idx)

    def _interrupt(self, q: FakeQueue, old: int, new: int) -> None:
        if self._has(vp.VIRTIO_F_EVENT_IDX):
            used_event = self.rd16(q.avail + 4 + 2 * q.size)
            if not vp.vring_need_event(used_event, new, old):
                return
        elif self.rd16(q.avail) & vp.VRING_AVAIL_F_NO_INTERRUPT:
            return
        self.st.isr |= 1
        if q.msix < self.msix_vectors and self.irq_fds[q.msix] >= 0:
            os.eventfd_write(self.irq_fds[q.msix], 1)

    def _process(self, qi: int) -> None:
        q = self.st.queues[qi]
        if not q.enable or not self.st.status & vp.STATUS_DRIVER_OK:
            return
        if qi == 2 * self.pairs:
            self._process_ctrl(qi, q)
        elif qi % 2 == 1:
            while (head := self._pop_avail(q)) is not None:
                data = b"".join(self.rd(a, n) for a, n, w in self._chain(q, head) if not w)
                hdr, frame = data[:12], data[12:]
                self.tx_frames.append((qi // 2, hdr, frame))
                if self.loopback:
                    self.pending_rx[qi // 2].append((hdr, frame))
                self._push_used(qi, q, head, 0)
            self._deliver(qi // 2)
        else:
            self._deliver(qi // 2)

    def _deliver(self, pair: int) -> None:
        qi = 2 * pair
        q = self.st.queues[qi]
        if not q.enable:
            return
        mrg = self._has(vp.VIRTIO_NET_F_MRG_RXBUF)
        while self.pending_rx[pair]:
            hdr, frame = self.pending_rx[pair][0]
            data = bytearray(hdr[:10] + b"\0\0" + frame)
            # Need enough buffers before consuming any (peek the avail ring).
            avail_n = (self.rd16(q.avail + 2) - q.last_avail) & 0xFFFF
            if avail_n == 0:
                return
            heads: list[tuple[int, int]] = []
            pos = 0
            saved = q.last_avail
            while pos < len(data):
                head = self._pop_avail(q)
                if head is None:
                    q.last_avail = saved  # not enough buffers: retry on next kick
                    return
                bufs = [(a, n) for a, n, w in self._chain(q, head) if w]
                used = 0
                for a, n in bufs:
                    piece = data[pos : pos + n]
                    self.wr(a, bytes(piece))
                    pos += len(piece)
                    used += len(piece)
                    if pos >= len(data):
                        break
                heads.append((head, used))
                if not mrg and pos < len(data):
                    raise ValueError("rx buffer too small without MRG_RXBUF")
            self.pending_rx[pair].pop(0)
            first_addr = self._chain(q, heads[0][0])[0][0]
            self.wr(first_addr + 10, struct.pack("<H", len(heads) if mrg else 1))
            for head, used in heads:
                self._push_used(qi, q, head, used)

    def _process_ctrl(self, qi: int, q: FakeQueue) -> None:
        while (head := self._pop_avail(q)) is not None:
            chain = self._chain(q, head)
            ro = b"".join(self.rd(a, n) for a, n, w in chain if not w)
            wr = [(a, n) for a, n, w in chain if w]
            cls, cmd, data = ro[0], ro[1], ro[2:]
            self.ctrl_log.append((cls, cmd, data))
            ack = vp.VIRTIO_NET_ERR
            if cls == vp.VIRTIO_NET_CTRL_MQ and cmd == vp.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:
                (n,) = struct.unpack("<H", data[:2])
                if 1 <= n <= self.pairs:
                    self.curr_pairs = n
                    ack = vp.VIRTIO_NET_OK
            elif cls == vp.VIRTIO_NET_CTRL_RX:
                ack = vp.VIRTIO_NET_OK
            self.wr(wr[-1][0], bytes([ack]))
            self._push_used(qi, q, head, 1)

    # -- vfio-user server ---------------------------------------------------------------

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self.join(timeout=5)
        self.listener.close()
        for fd in self.irq_fds:
            if fd >= 0:
                os.close(fd)
        for _, _, m in self.dma:
            m.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self.notify_fd >= 0:
            os.close(self.notify_fd)

    def inject(self, frame: bytes, pair: int = 0, hdr: bytes = bytes(12)) -> None:
        """Queue a frame 'from the wire' for delivery on rx of ``pair``."""
        self.inject_q.put((pair, hdr, frame))
        os.write(self._stop_w, b"i")

    def run(self) -> None:
        try:
            r, _, _ = select.select([self.listener.fileno(), self._stop_r], [], [])
            if self._stop_r in r:
                return
            conn, _ = self.listener.accept()
            with conn:
                self._serve(conn)
        except BaseException as e:  # pragma: no cover - surfaced by the tests
            log.exception("fake device crashed")
            self.errors.append(e)

    def _recv(self, conn: socket.socket) -> tuple[vu.Header, bytes, list[int]] | None:
        fds: list[int] = []
        buf = b""
        while len(buf) < 16:
            d, anc, _, _ = conn.recvmsg(16 - len(buf), socket.CMSG_SPACE(64 * 4))
            for lvl, typ, cd in anc:
                if lvl == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cd[: len(cd) - len(cd) % 4])
                    fds.extend(a)
            if not d:
                return None
            buf += d
        hdr = vu.Header.unpack(buf)
        body = b""
        while len(body) < hdr.msg_size - 16:
            d = conn.recv(hdr.msg_size - 16 - len(body))
            if not d:
                return None
            body += d
        return hdr, body, fds

    def _serve(self, conn: socket.socket) -> None:
        while True:
            timeout = 0.001 if self.mmap_notify else None
            r, _, _ = select.select([conn.fileno(), self._stop_r], [], [], timeout)
            if not r:
                for qi in range(self.nq):
                    self._process(qi)
                continue
            if self._stop_r in r:
                if os.read(self._stop_r, 1) == b"x":
                    return
                while not self.inject_q.empty():
                    pair, hdr, frame = self.inject_q.get()
                    self.pending_rx[pair].append((hdr, frame))
                    self._deliver(pair)
                continue
            m = self._recv(conn)
            if m is None:
                return
            msg_hdr, body, fds = m
            try:
                out, err = self._handle(msg_hdr, body, fds)
            except Exception as e:
                log.warning("fake device: %s failed: %s", msg_hdr.cmd, e)
                out, err = b"", errno.EINVAL
            fds_out, self._reply_fds = self._reply_fds, []
            if not msg_hdr.no_reply:
                data = vu.pack_message(
                    msg_hdr.msg_id, msg_hdr.cmd, out if not err else b"", reply=True, error_no=err
                )
                anc = []
                if fds_out and not err:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds_out))]
                conn.sendmsg([data], anc)

    def _handle(self, hdr: vu.Header, body: bytes, fds: list[int]) -> tuple[bytes, int | None]:
        cmd = hdr.cmd
        if cmd == vu.Command.VERSION:
            caps = {"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20}}
            return vu.pack_version(0, 1, caps), None
        if cmd == vu.Command.DEVICE_GET_INFO:
            return struct.pack("<IIII", 16, 3, 10, 5), None
        if cmd == vu.Command.DEVICE_GET_REGION_INFO:
            argsz, _, idx, _, _, _ = vu.REGION_INFO.unpack_from(body)
            size = 256 if idx == 7 else BAR_SIZES.get(idx, 0)
            if idx == VIRTIO_BAR and self.mmap_notify:
                cap_bytes = struct.pack("<HHIIIQQ", 1, 1, 0, 1, 0, NOTIFY_OFF, 0x1000)
                full = 32 + len(cap_bytes)
                flags = 0xF if argsz >= full else 0x7
                info = vu.REGION_INFO.pack(full, flags, idx, 32 if argsz >= full else 0, size, 0)
                if argsz < full:
                    return info, None
                # Region offset 0 in the memfd: the notify page is at NOTIFY_OFF.
                self._reply_fds = [self.notify_fd]
                return info + cap_bytes, None
            return vu.REGION_INFO.pack(32, 3 if size else 0, idx, 0, size, 0), None
        if cmd == vu.Command.DEVICE_GET_IRQ_INFO:
            _, _, idx, _ = vu.IRQ_INFO.unpack_from(body)
            count = self.msix_vectors if idx == 2 else 0
            return vu.IRQ_INFO.pack(16, 1, idx, count), None
        if cmd == vu.Command.DEVICE_SET_IRQS:
            _, _flags, idx, start, count = vu.IRQ_SET.unpack_from(body)
            if idx != 2:
                return b"", errno.EINVAL
            if count == 0:
                for i, fd in enumerate(self.irq_fds):
                    if fd >= 0:
                        os.close(fd)
                        self.irq_fds[i] = -1
                return b"", None
            if start + count > self.msix_vectors or len(fds) != count:
                for fd in fds:
                    os.close(fd)
                return b"", errno.EINVAL
            for i, fd in enumerate(fds):
                if self.irq_fds[start + i] >= 0:
                    os.close(self.irq_fds[start + i])
                self.irq_fds[start + i] = fd
            return b"", None
        if cmd == vu.Command.DMA_MAP:
            _, _flags, offset, addr, size = vu.DMA_MAP.unpack_from(body)
            m = mmap.mmap(fds[0], size, mmap.MAP_SHARED, offset=offset)
            os.close(fds[0])
            self.dma.append((addr, size, m))
            return b"", None
        if cmd == vu.Command.DMA_UNMAP:
            _, _, addr, size = vu.DMA_UNMAP.unpack_from(body)
            for ent in list(self.dma):
                if ent[0] == addr and ent[1] == size:
                    ent[2].close()
                    self.dma.remove(ent)
                    return body[:24], None
            return b"", errno.ENOENT
        if cmd == vu.Command.DEVICE_RESET:
            self._reset_queues()
            return b"", None
        if cmd in (vu.Command.REGION_READ, vu.Command.REGION_WRITE):
            region, off, count, data = vu.unpack_region_access(body)
            write = cmd == vu.Command.REGION_WRITE
            res = self._region(region, off, count, data if write else None)
            return vu.pack_region_access(region, off, count, b"" if write else res), None
        return b"", errno.EINVAL

    def _region(self, region: int, off: int, count: int, data: bytes | None) -> bytes:
        if region == 7:
            if off + count > 256:
                raise ValueError("config access out of range")
            if data is None:
                return bytes(self.cfg[off : off + count])
            for i, b in enumerate(data):
                a = off + i
                # Writable: command register, MSI-X message control high byte.
                if a in (0x04, 0x05) or a == 0x83:
                    self.cfg[a] = b
            return b""
        if region == MSIX_BAR:
            return bytes(count) if data is None else b""
        if region != VIRTIO_BAR or off + count > BAR_SIZES[VIRTIO_BAR]:
            raise ValueError(f"bad region access {region}/{off:#x}")
        if ISR_OFF <= off < COMMON_OFF:
            if data is None:
                v, self.st.isr = self.st.isr, 0
                return bytes([v]).ljust(count, b"\0")
            return b""
        if COMMON_OFF <= off < DEVICE_OFF:
            o = off - COMMON_OFF
            if data is None:
                return self._common_image()[o : o + count]
            self._common_write(o, data)
            return b""
        if DEVICE_OFF <= off < NOTIFY_OFF:
            o = off - DEVICE_OFF
            return self._device_cfg()[o : o + count] if data is None else b""
        # notify
        if data is None:
            return bytes(count)
        qi = (off - NOTIFY_OFF) // self.notify_mult
        if int.from_bytes(data, "little") != qi:
            raise ValueError(f"notify value {data.hex()} at queue {qi}'s address")
        self.kicks[qi] = self.kicks.get(qi, 0) + 1
        self._process(qi)
        return b""
