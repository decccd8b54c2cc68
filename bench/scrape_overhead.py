"""What Prometheus scrapes cost the datapath: guest receive throughput with and
without a scrape loop (10 scrapes/s, ten times Prometheus' usual rate) running
against the daemon, alternated over several rounds in one guest boot.

    python bench/scrape_overhead.py [--seconds 5] [--rounds 3] [--rate 10]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys

from vfiouser_net_harness.iperf import run_iperf3
from vfiouser_net_harness.scenarios import guest_on_vfiouser_net

SCRAPER = """
import sys, time, urllib.request
url, period = sys.argv[1], 1.0 / float(sys.argv[2])
n = 0
while True:
    t = time.monotonic()
    urllib.request.urlopen(url).read()
    n += 1
    time.sleep(max(0.0, period - (time.monotonic() - t)))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=10.0, help="scrapes per second")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    plain: list[float] = []
    scraped: list[float] = []
    with guest_on_vfiouser_net(server_args=["--queue-pairs", "2"]) as (guest, ns, server):
        url = server.metrics_url()
        for _ in range(args.rounds):
            res = run_iperf3(
                guest, ns, direction="guest_rx", seconds=args.seconds, streams=2, check=False
            )
            plain.append(res.receiver_bps / 1e9)
            scraper = ns.popen(
                [sys.executable, "-c", SCRAPER, url, str(args.rate)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                res = run_iperf3(
                    guest, ns, direction="guest_rx", seconds=args.seconds, streams=2, check=False
                )
                scraped.append(res.receiver_bps / 1e9)
            finally:
                scraper.kill()
                scraper.wait()
    a, b = statistics.mean(plain), statistics.mean(scraped)
    print(
        f"\nguest receive, 2 streams, {args.seconds} s x {args.rounds} rounds, "
        f"{args.rate:g} scrapes/s"
    )
    print("| | Gbit/s (mean) | rounds |")
    print("|---|---|---|")
    print(f"| no scraping | {a:.3f} | {', '.join(f'{x:.2f}' for x in plain)} |")
    print(f"| scraping | {b:.3f} | {', '.join(f'{x:.2f}' for x in scraped)} |")
    print(f"cost: {100 * (a - b) / a:+.1f}% (negative: faster with scraping, i.e. noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
