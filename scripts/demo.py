"""The demo: start the daemon, boot a small Linux guest attached to it over
vfio-user, and move traffic (ping and iperf3 both ways), printing figures."""

from __future__ import annotations

import logging
import sys

from vfiouser_net_harness.iperf import run_iperf3
from vfiouser_net_harness.scenarios import guest_on_vfiouser_net

log = logging.getLogger("demo")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with guest_on_vfiouser_net() as (guest, ns, server):
        print(
            "guest sees:",
            guest.check("cat /sys/class/net/eth0/address").strip(),
            "driver",
            guest.check("readlink /sys/class/net/eth0/device/driver").strip(),
        )
        print(guest.check(f"ping -c 5 {ns.host_addr}"))
        for direction in ("guest_tx", "guest_rx"):
            res = run_iperf3(guest, ns, direction=direction, seconds=5)
            print(
                f"iperf3 {direction}: {res.receiver_bps / 1e9:.2f} Gbit/s "
                f"({res.received_bytes} bytes received of {res.sent_bytes} sent)"
            )
    print("server log:", server.log_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
