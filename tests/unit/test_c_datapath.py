"""The C datapath's unit tests (tests/c, cmocka), run through
``make -C vfiouser_net/csrc test``, plainly and under ASan+UBSan (SAN=1), so
that the Python test run (and CI) runs them too.

Each test binary must report every test case it defines as passed: the
expected number is the count of ``static void test_*(void **state)``
functions in its source, so a test that is defined but not registered, or a
binary that dies half-way, fails here.

Without a C compiler, cmocka or the libvfio-user headers the tests are
skipped, except under CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from vfiouser_net_harness.prereq import require

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "vfiouser_net" / "csrc"
TESTS_C = ROOT / "tests" / "c"
LIBVFIO_USER_PREFIX = Path(
    os.environ.get("LIBVFIO_USER_PREFIX", "/var/cache/vfiouser-net/libvfio-user/prefix")
)

_TEST_FN = re.compile(r"^static void (test_\w+)\(void \*\*state\)", re.M)
_SECTION = re.compile(r"^== \S*/(test_\w+)$")
_RUNNING = re.compile(r"^\[==========\] Running (\d+) test\(s\)\.$")
_PASSED = re.compile(r"^\[  PASSED  \] (\d+) test\(s\)\.$")
_FAILED = re.compile(r"^\[  FAILED  \] ")


def _missing_prerequisite() -> str | None:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    if shutil.which("make") is None:
        return "no make"
    have_cmocka = Path("/usr/include/cmocka.h").is_file()
    if not have_cmocka and shutil.which("pkg-config") is not None:
        have_cmocka = (
            subprocess.run(["pkg-config", "--exists", "cmocka"], check=False).returncode == 0
        )
    if not have_cmocka:
        return "cmocka is not installed (libcmocka-dev)"
    if not (LIBVFIO_USER_PREFIX / "include" / "vfio-user" / "libvfio-user.h").is_file():
        return f"libvfio-user headers not under {LIBVFIO_USER_PREFIX} (run scripts/setup.sh)"
    return None


def _require_prerequisites() -> None:
    missing = _missing_prerequisite()
    require(missing is None, missing or "")


def expected_cases() -> dict[str, int]:
    """Test cases per binary: the test functions its source defines."""
    return {
        src.stem: len(_TEST_FN.findall(src.read_text())) for src in sorted(TESTS_C.glob("test_*.c"))
    }


def parse_results(output: str) -> dict[str, tuple[int, int, int]]:
    """Per binary: (cases announced, cases passed, failure lines)."""
    results: dict[str, tuple[int, int, int]] = {}
    current: str | None = None
    for line in output.splitlines():
        if m := _SECTION.match(line):
            current = m.group(1)
            results[current] = (0, 0, 0)
            continue
        if current is None:
            continue
        running, passed, failed = results[current]
        if m := _RUNNING.match(line):
            running = int(m.group(1))
        elif m := _PASSED.match(line):
            passed = int(m.group(1))
        elif _FAILED.match(line):
            failed += 1
        results[current] = (running, passed, failed)
    return results


def test_expected_cases_are_found() -> None:
    counts = expected_cases()
    assert set(counts) >= {
        "test_virtq",
        "test_rx_filter",
        "test_ctrl",
        "test_worker",
        "test_steering",
        "test_ctrl_mq",
        "test_worker_mq",
        "test_ctrl_stats",
    }
    assert all(n > 0 for n in counts.values()), counts


def test_parse_results() -> None:
    out = "\n".join(
        [
            "make: Entering directory '/x'",
            "== build/tests/test_a",
            "[==========] Running 2 test(s).",
            "[ RUN      ] test_one",
            "[       OK ] test_one",
            "[==========] 2 test(s) run.",
            "[  PASSED  ] 2 test(s).",
            "== build-san/tests/test_b",
            "[==========] Running 3 test(s).",
            "[  FAILED  ] test_two",
            "[  PASSED  ] 2 test(s).",
            "[  FAILED  ] 1 test(s), listed below:",
            "[  FAILED  ] test_two",
        ]
    )
    assert parse_results(out) == {"test_a": (2, 2, 0), "test_b": (3, 2, 3)}


@pytest.mark.parametrize("san", [False, True], ids=["plain", "asan-ubsan"])
def test_c_unit_tests(san: bool) -> None:
    _require_prerequisites()
    cmd = ["make", "-C", str(CSRC), f"-j{min(os.cpu_count() or 1, 8)}", "test"]
    cmd.append(f"LIBVFIO_USER_PREFIX={LIBVFIO_USER_PREFIX}")
    if san:
        cmd.append("SAN=1")
    proc = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
        check=False,
    )
    output = proc.stdout
    tail = "\n".join(output.splitlines()[-60:])
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}"
    results = parse_results(output)
    expected = expected_cases()
    assert set(results) == set(expected), f"binaries run {sorted(results)}:\n{tail}"
    for name, want in expected.items():
        running, passed, failed = results[name]
        assert (running, passed, failed) == (want, want, 0), (
            f"{name}: {running} announced, {passed} passed, {failed} failure lines; "
            f"{want} test functions defined\n{tail}"
        )
