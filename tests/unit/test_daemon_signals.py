"""The daemon's signals: handled on its loop, never inside a lock.

A SIGTERM whose handler called threading.Event.set() while the main thread
sat inside that event's wait() deadlocked the daemon (once in a few hundred
stops in CI). These runs put the signal at every moment of the loop, with the
loop's poll period made tiny so that the moments inside a lock are many.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A child process sends SIGUSR2 and SIGTERM at random moments, as an operator
# or systemd would (from outside: a thread of ours would send them only while
# the main thread waits without the GIL, never inside the event's lock).
# Each trial: a new daemon (no devices) runs its loop until a SIGTERM's
# handler, run on the loop, has stopped it.
TRIALS_SCRIPT = textwrap.dedent(
    """
    import os, random, signal, sys, time
    from vfiouser_net import daemon as daemon_mod

    daemon_mod.LINK_POLL_SECONDS = 0.00001
    trials = int(sys.argv[1])
    parent = os.getpid()
    sender = os.fork()
    if sender == 0:
        rnd = random.Random(1)
        while True:
            time.sleep(rnd.uniform(0.0001, 0.001))
            os.kill(parent, signal.SIGUSR2 if rnd.random() < 0.3 else signal.SIGTERM)
    try:
        for trial in range(trials):
            d = daemon_mod.Daemon()
            seen = []

            def on_usr2(sig, seen=seen):
                seen.append(sig)

            def on_term(sig, d=d, seen=seen):
                seen.append(sig)
                d.stop()

            d.handle_signals({signal.SIGTERM: on_term, signal.SIGUSR2: on_usr2})
            d.run()
            d.shutdown()
            assert signal.SIGTERM in seen, seen
    finally:
        os.kill(sender, signal.SIGKILL)
        os.waitpid(sender, 0)
    print(f"{trials} trials ok")
    """
)


def test_sigterm_at_any_moment_stops_the_loop() -> None:
    trials = 3000
    proc = subprocess.run(
        [sys.executable, "-c", TRIALS_SCRIPT, str(trials)],
        capture_output=True,
        text=True,
        # A hang is the failure this guards against (3000 trials: ~3 s).
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{trials} trials ok" in proc.stdout


def test_stop_from_another_thread_wakes_the_loop() -> None:
    script = textwrap.dedent(
        """
        import threading, time
        from vfiouser_net import daemon as daemon_mod

        daemon_mod.LINK_POLL_SECONDS = 3600
        d = daemon_mod.Daemon()
        threading.Timer(0.2, d.stop).start()
        t0 = time.monotonic()
        d.run()
        d.shutdown()
        print(f"returned after {time.monotonic() - t0:.3f}")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Woken by stop(), not by the hour-long poll period.
    elapsed = float(proc.stdout.split()[-1])
    assert 0.15 < elapsed < 30, proc.stdout
