"""atheris target: the daemon's TOML configuration loader and the MAC parser.

The first byte chooses: even, the rest is a configuration file's bytes for
vfiouser_net.config.load (ConfigError is its only documented error: a
broken file must give a message naming the file, never a traceback); odd,
the rest is a MAC address for vfiouser_net.device_options.parse_mac (DeviceError;
what it accepts is six two-digit hex pairs and prints back the same).
A loaded configuration is valid: every device passes its own validation,
names are unique, the log level is known.

    python tests/fuzz/fuzz_config.py [libFuzzer flags] CORPUS_DIR
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["vfiouser_net"]):
    from vfiouser_net import config
    from vfiouser_net.counters import format_mac
    from vfiouser_net.device_options import DeviceError, parse_mac

HEX = set("0123456789abcdefABCDEF")
_DIR = tempfile.mkdtemp(prefix="vn-fuzz-config-")
PATH = os.path.join(_DIR, "vfiouser-net.toml")


def check_config(cfg: config.DaemonConfig) -> None:
    assert cfg.log_level in ("debug", "info", "warning", "error")
    names = set()
    for opts in cfg.devices:
        opts.validate()
        assert len(opts.mac) == 6 and not opts.mac[0] & 1
        name = opts.name or opts.socket_path.rsplit("/", 1)[-1]
        assert name not in names
        names.add(name)


def check_mac(text: str) -> None:
    try:
        mac = parse_mac(text)
    except DeviceError:
        return
    parts = text.split(":")
    assert len(parts) == 6 and all(len(x) == 2 and set(x) <= HEX for x in parts), text
    assert format_mac(mac) == text.lower(), (text, mac)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        check_mac(data[1:].decode("utf-8", "replace"))
        return
    with open(PATH, "wb") as f:
        f.write(data[1:])
    try:
        cfg = config.load(PATH)
    except config.ConfigError as exc:
        assert str(exc).startswith(PATH), str(exc)
        return
    check_config(cfg)


def main() -> None:
    logging.disable(logging.CRITICAL)  # the control plane's warnings, per input
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
