"""`vfiouser-net ctl`: the operator's client for the daemon's admin socket.

    vfiouser-net ctl [--admin-socket PATH] [--json] [--timeout S] COMMAND ARGS...

The command line is built from the command schema (`admin.protocol.COMMANDS`),
arguments are checked before anything is sent, and results print as tables
(or as JSON with --json). Exit status: 0 done, 1 the daemon refused or failed
the command, 2 a usage error (unknown command, bad argument), 3 the daemon
could not be reached (no socket, permission denied, no reply).

This module imports only the protocol (standard library and msgpack), never
the datapath.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vfiouser_net.admin.protocol import (
    COMMANDS,
    DEFAULT_ADMIN_SOCKET,
    AdminClient,
    ArgSpec,
    ProtocolError,
    RemoteError,
    Unreachable,
    validate_args,
)

PROG = "vfiouser-net ctl"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


# -- command line ---------------------------------------------------------------------


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


_CONVERTERS: dict[str, Callable[[str], Any]] = {"int": _int, "number": _number, "str": str}


def _add_arg(parser: argparse.ArgumentParser, arg: ArgSpec) -> None:
    kwargs: dict[str, Any] = {"help": arg.help, "type": _CONVERTERS.get(arg.type, str)}
    if arg.choices:
        kwargs["choices"] = arg.choices
    if arg.positional:
        if arg.choices:
            kwargs["metavar"] = "{" + ",".join(arg.choices) + "}"
        else:
            kwargs["metavar"] = arg.display
        if not arg.required:
            kwargs["nargs"] = "?"
            kwargs["default"] = None
        parser.add_argument(arg.name, **kwargs)
    else:
        if arg.type == "bool":
            parser.add_argument(
                arg.option, dest=arg.name, action="store_true", default=None, help=arg.help
            )
            return
        if not arg.choices:
            kwargs["metavar"] = arg.display
        parser.add_argument(
            arg.option, dest=arg.name, required=arg.required, default=None, **kwargs
        )


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Query and control a running vfiouser-net daemon over its admin socket.",
        epilog="exit status: 0 done, 1 the daemon refused or failed the command, "
        "2 usage error, 3 daemon unreachable",
    )
    parser.add_argument(
        "--admin-socket",
        default=DEFAULT_ADMIN_SOCKET,
        metavar="PATH",
        help=f"the daemon's admin socket (default {DEFAULT_ADMIN_SOCKET})",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--timeout",
        type=_number,
        default=30.0,
        metavar="S",
        help="seconds to wait for the daemon (default 30)",
    )
    sub = parser.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True)
    subparsers: dict[str, argparse.ArgumentParser] = {}
    for spec in COMMANDS.values():
        description = spec.help + (f" ({spec.notes})" if spec.notes else "")
        sp = sub.add_parser(spec.name, help=spec.help, description=description)
        for arg in spec.args:
            _add_arg(sp, arg)
        subparsers[spec.name] = sp
    return parser, subparsers


# -- output ---------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def _updown(flag: Any) -> str:
    return "up" if flag else "down"


def _driver(dev: dict[str, Any]) -> str:
    names: list[str] = list(dev.get("status_names", []))
    for bad in ("FAILED", "NEEDS_RESET"):
        if bad in names:
            return bad
    return names[-1] if names else "reset"


def _policy(policy: Any, effective: Any) -> str:
    return str(policy) if policy == effective else f"{policy} ({effective})"


def _fmt_list(r: dict[str, Any]) -> str:
    devices = r.get("devices", [])
    if not devices:
        return "no devices"
    rows = [
        [
            d["name"],
            d["socket"],
            d["tap"],
            _yes(d["connected"]),
            _updown(d["link_up"]),
            _driver(d),
            f"{d['active_queue_pairs']}/{d['max_queue_pairs']}",
            _policy(d["policy"], d["effective"]),
        ]
        for d in devices
    ]
    return _table(["NAME", "SOCKET", "TAP", "CLIENT", "LINK", "DRIVER", "PAIRS", "STEERING"], rows)


def _wrap(words: Sequence[str], indent: int, width: int = 100) -> str:
    lines: list[str] = []
    line = ""
    for word in words:
        if line and indent + len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return ("\n" + " " * indent).join(lines)


def _tap_io(mode: str) -> str:
    return {
        "io_uring": "io_uring (a ring pass's frames in one system call)",
        "writev": "writev (one system call a frame)",
    }.get(mode, mode)


def _fmt_show(d: dict[str, Any]) -> str:
    steer = d["steering"]
    rss = steer["rss"]
    link = _updown(d["link_up"])
    if not d.get("operator_link_up", True):
        link += " (operator switch down)"
    elif not d["link_up"]:
        link += " (TAP down)"
    status = d["status"]
    status_text = "|".join(d["status_names"]) or "reset"
    mac = d["mac"]
    if d["configured_mac"] != mac:
        mac += f" (configured {d['configured_mac']})"
    rows: list[tuple[str, str]] = [
        ("socket", d["socket"]),
        ("tap", d["tap"]),
        ("client", "connected" if d["connected"] else "not connected"),
        ("driver status", f"0x{status:02x} {status_text}"),
        ("features", _wrap(d["features"], 17) if d["features"] else "(none negotiated)"),
        ("offered", _wrap(d.get("offered_features", []), 17) or "-"),
        ("mac", mac),
        ("mtu", str(d["mtu"])),
        ("speed", f"{d['speed_mbps']} Mbit/s"),
        ("tap i/o", _tap_io(d.get("tap_io", "-"))),
        ("link", link),
        (
            "queue pairs",
            f"{d['active_queue_pairs']} active of {d['max_queue_pairs']}"
            f" (queue size {d['queue_size']})",
        ),
        (
            "steering",
            f"{steer['policy']}, effective {steer['effective']}, {_switches(steer['switches'])}",
        ),
    ]
    if rss.get("configured"):
        types = "|".join(rss.get("hash_type_names", [])) or "none"
        rows.append(("rss", f"hash types {types}, unclassified queue {rss['unclassified_queue']}"))
        rows.append(("rss key", rss.get("key", "") or "(empty)"))
        table = rss.get("table", [])
        chunks = [
            f"{i:3d}: " + " ".join(str(q) for q in table[i : i + 16])
            for i in range(0, len(table), 16)
        ]
        rows.append(("rss table", f"{len(table)} entries"))
        rows.extend(("", c) for c in chunks)
    else:
        rows.append(("rss", "not configured by the guest"))
    f = d.get("rx_filter", {})
    if f:
        rows.append(
            (
                "rx filter",
                f"promisc {'on' if f.get('promisc') else 'off'}, "
                f"allmulti {'on' if f.get('allmulti') else 'off'}",
            )
        )
        uc = list(f.get("unicast", [])) + (["(overflow)"] if f.get("uni_overflow") else [])
        mc = list(f.get("multicast", [])) + (["(overflow)"] if f.get("multi_overflow") else [])
        rows.append(("  unicast", _wrap(uc, 17) if uc else "-"))
        rows.append(("  multicast", _wrap(mc, 17) if mc else "-"))
    lines = [f"device {d['name']}"]
    lines += [f"  {k + ':' if k else '':<15}{v}" for k, v in rows]
    return "\n".join(lines)


def _fmt_queues(r: dict[str, Any]) -> str:
    queues = r.get("queues", [])
    if not queues:
        return f"{r.get('device')}: no queues"
    rows = []
    for q in queues:
        if q.get("broken"):
            state = "BROKEN"
        elif q.get("ready"):
            state = "ready"
        elif q.get("configured"):
            state = "configured"
        else:
            state = "off"
        rows.append(
            [
                q["index"],
                q["kind"],
                "-" if q.get("pair") is None else q["pair"],
                state,
                q["size"],
                q["msix_vector"],
                q["avail_idx"],
                q["last_avail_idx"],
                q["used_idx"],
                q["in_flight"],
                _yes(q.get("event_idx")),
            ]
        )
    return _table(
        [
            "QUEUE",
            "KIND",
            "PAIR",
            "STATE",
            "SIZE",
            "VECTOR",
            "AVAIL",
            "LAST_AVAIL",
            "USED",
            "IN_FLIGHT",
            "EVENT_IDX",
        ],
        rows,
    )


_DIR_COLUMNS = (
    ("PACKETS", "packets"),
    ("BYTES", "bytes"),
    ("DOORBELLS", "doorbells"),
    ("IRQS", "interrupts"),
    ("IRQS_SUPPRESSED", "interrupts_suppressed"),
    ("IRQS_COALESCED", "interrupts_coalesced"),
    ("RING_FULL", "ring_full"),
    ("STEERED_OUT", "steered_out"),
)


def _dir_row(label: Sequence[Any], s: dict[str, Any]) -> list[Any]:
    drops = sum(s.get("drops", {}).values())
    errors = sum(s.get("errors", {}).values())
    return [*label, *(s.get(key, 0) for _, key in _DIR_COLUMNS), drops, errors]


def _fmt_stats(r: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    reasons: list[str] = []
    for qp, pair in enumerate(r.get("queues", [])):
        for direction in ("rx", "tx"):
            s = pair.get(direction, {})
            rows.append(_dir_row([qp, direction], s))
            for kind in ("drops", "errors"):
                for reason, n in s.get(kind, {}).items():
                    if n:
                        reasons.append(f"  {qp} {direction} {kind[:-1]} {reason}: {n}")
    ctrl = r.get("ctrl")
    if ctrl:
        rows.append(_dir_row(["-", "ctrl"], ctrl))
        for kind in ("drops", "errors"):
            for reason, n in ctrl.get(kind, {}).items():
                if n:
                    reasons.append(f"  ctrl {kind[:-1]} {reason}: {n}")
    out = [
        f"device {r.get('device')}",
        _table(["PAIR", "DIR", *(h for h, _ in _DIR_COLUMNS), "DROPS", "ERRORS"], rows),
    ]
    if reasons:
        out += ["drops and errors by reason:", *reasons]
    counters = r.get("counters", {})
    if counters:
        out.append("device counters:")
        for key, value in counters.items():
            if key == "ctrl_cmds":
                for cls, cmds in (value or {}).items():
                    for cmd, (ok, err) in cmds.items():
                        out.append(f"  control command {cls}.{cmd}: {ok} ok, {err} failed")
            else:
                out.append(f"  {key}: {value}")
    resets = r.get("resets", {})
    if resets:
        out.append("resets: " + ", ".join(f"{k} {v}" for k, v in sorted(resets.items())))
    return "\n".join(out)


def _fmt_link(r: dict[str, Any]) -> str:
    if r["operator_link_up"] and not r["link_up"]:
        return (
            f"{r['device']}: link switch up, but the link stays down while TAP {r['tap']} is down"
        )
    return f"{r['device']}: link {_updown(r['link_up'])}"


def _switches(n: Any) -> str:
    return f"{n} switch" if n == 1 else f"{n} switches"


def _fmt_steering(r: dict[str, Any]) -> str:
    return (
        f"{r['device']}: steering {r['policy']} (effective {r['effective']}, "
        f"{_switches(r['switches'])})"
    )


def _fmt_help(r: dict[str, Any]) -> str:
    out: list[str] = []
    for c in r.get("commands", []):
        out.append(c["usage"])
        out.append(f"    {c['help']}")
        if c.get("notes"):
            out.append(f"    note: {c['notes']}")
        for a in c.get("args", []):
            extra = f" ({', '.join(a['choices'])})" if a.get("choices") else ""
            req = "" if a.get("required") else ", optional"
            out.append(f"      {a['name']}: {a['type']}{req}: {a['help']}{extra}")
    return "\n".join(out)


def _fmt_generic(r: Any) -> str:
    if isinstance(r, dict):
        return "\n".join(f"{k}: {v}" for k, v in r.items())
    return str(r)


FORMATTERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "help": _fmt_help,
    "version": lambda r: (
        f"vfiouser-net {r['version']} (admin protocol {r['protocol']}), pid {r['pid']}"
    ),
    "list": _fmt_list,
    "show": _fmt_show,
    "queues": _fmt_queues,
    "stats": _fmt_stats,
    "link": _fmt_link,
    "steering": _fmt_steering,
    "log-level": lambda r: f"log level {r['level']}",
    "add": lambda r: (
        f"added {r['name']}: socket {r['socket']}, TAP {r['tap']}, "
        f"{r['max_queue_pairs']} queue pair(s), steering {r['policy']}"
    ),
    "remove": lambda r: f"removed {r['removed']}",
}


def format_result(command: str, result: Any) -> str:
    fmt = FORMATTERS.get(command)
    if fmt is None or not isinstance(result, dict):
        return _fmt_generic(result)
    try:
        return fmt(result)
    except (KeyError, TypeError, ValueError):
        # A daemon newer or older than this client: show what it sent.
        return json.dumps(result, indent=2, sort_keys=True, default=str)


# -- main ---------------------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _unreachable_hint(exc: Unreachable) -> str:
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return " (is the daemon running, with this admin socket?)"
    if exc.errno == errno.EACCES:
        return " (run as root or as a member of the daemon's admin group)"
    return ""


# The daemon ends a capture bounded by count alone after this long.
CAPTURE_MAX_SECONDS = 600.0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ctl command; argv excludes the program name and "ctl"."""
    parser, subparsers = _build()
    try:
        ns = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    spec = COMMANDS[ns.ctl_command]
    args = {a.name: getattr(ns, a.name) for a in spec.args if getattr(ns, a.name) is not None}
    try:
        validate_args(spec, args)
    except ProtocolError as exc:
        subparsers[spec.name].print_usage(sys.stderr)
        _error(exc.message)
        return EXIT_USAGE
    if ns.timeout <= 0:
        _error("--timeout must be positive")
        return EXIT_USAGE
    timeout = ns.timeout
    if spec.name == "capture":
        # The reply comes when the capture ends: by its duration, or by the
        # daemon's limit for a capture bounded by count alone.
        timeout = max(timeout, float(args.get("seconds") or CAPTURE_MAX_SECONDS) + 10.0)
    try:
        with AdminClient(ns.admin_socket, timeout) as client:
            result = client.call(spec.name, args)
    except Unreachable as exc:
        _error(exc.message + _unreachable_hint(exc))
        return EXIT_UNREACHABLE
    except RemoteError as exc:
        _error(f"{exc.message} [{exc.code}]")
        if ns.json:
            print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
        return EXIT_ERROR
    except ProtocolError as exc:
        _error(f"unexpected reply from the daemon: {exc.message}")
        return EXIT_ERROR
    if ns.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(format_result(spec.name, result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
