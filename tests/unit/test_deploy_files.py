"""The deployment files in deploy/: systemd units, tmpfiles.d and sysusers.d,
the example configuration, the QEMU example and the libvirt domain.

systemd's own tools check what they can: ``systemd-analyze verify`` every
unit (copied to a temporary directory with ExecStart= pointing at this
venv's ``vfiouser-net``, since verify refuses a missing binary), with a
deliberately broken copy first to show that its warnings are caught;
``systemd-analyze security --offline`` the exposure of the services;
``systemd-sysusers``/``systemd-tmpfiles`` with ``--root`` that the user,
groups and /run/vfiouser-net come out as the units expect. Without
systemd-analyze those tests are skipped, except under CI (CI=true), where
that is a failure.

The rest reads the files: every hardening option the services must have,
the units' command lines expanded as systemd would (specifiers, Environment=,
the example EnvironmentFile) and parsed by the daemon's own command line
parser, the example TOML loaded by vfiouser_net.config.load, the libvirt
XML's memory backing and -device JSON, and the QEMU example run with a
stand-in QEMU that records its arguments.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfiouser_net_harness.prereq import require
from vfiouser_net_harness.systemd_unit import (
    UnitFile,
    exec_argv,
    parse_unit,
    read_environment_file,
    service_environment,
)

from vfiouser_net import cli
from vfiouser_net.config import DaemonConfig
from vfiouser_net.config import load as load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
INSTANCE_SERVICE = SYSTEMD / "vfiouser-net@.service"
INSTANCE_SOCKET = SYSTEMD / "vfiouser-net@.socket"
HOST_SERVICE = SYSTEMD / "vfiouser-net.service"
ENV_EXAMPLE = SYSTEMD / "vm1.env.example"
TMPFILES = DEPLOY / "tmpfiles.d" / "vfiouser-net.conf"
SYSUSERS = DEPLOY / "sysusers.d" / "vfiouser-net.conf"
TOML_EXAMPLE = DEPLOY / "vfiouser-net.toml.example"
QEMU_EXAMPLE = DEPLOY / "qemu" / "example.sh"
LIBVIRT_DOMAIN = DEPLOY / "libvirt" / "domain.xml"
DEPLOY_README = DEPLOY / "README.md"
SERVICES = [INSTANCE_SERVICE, HOST_SERVICE]

INSTALLED_BINARY = "/usr/local/bin/vfiouser-net"
RUN_DIR = "/run/vfiouser-net"
SERVICE_USER = "vfiouser-net"
QEMU_GROUP = "kvm"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
MAX_EXPOSURE = 3.0  # systemd-analyze security: 0 (locked down) .. 10 (exposed)


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed ({package} package)")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    return _tool("systemd-analyze", "systemd")


def venv_binary() -> Path:
    """The `vfiouser-net` script of the Python running the tests."""
    return Path(sys.executable).parent / "vfiouser-net"


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart= pointing at an existing vfiouser-net."""
    binary = venv_binary()
    if not binary.exists():
        pytest.fail(f"{binary} missing: install the project in this venv (pip install -e .)")
    out = tmp_path / "units"
    out.mkdir()
    for unit in (INSTANCE_SERVICE, INSTANCE_SOCKET, HOST_SERVICE):
        text = unit.read_text()
        assert INSTALLED_BINARY in text or unit.suffix == ".socket", unit
        (out / unit.name).write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return out


def run_verify(systemd_analyze: str, *units: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify; returns its exit status and its lines about these units."""
    proc = subprocess.run(
        [systemd_analyze, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = {u.name for u in units} | {u.parent.name for u in units}
    ours |= {u.name.replace("vm1", "") for u in units}
    lines = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if any(name in line for name in ours) or str(units[0].parent) in line
    ]
    return proc.returncode, lines


# -- systemd-analyze ----------------------------------------------------------------


def test_verify_catches_mistakes(systemd_analyze: str, unit_dir: Path) -> None:
    """A misspelt setting and a missing binary are reported (else the next test proves
    nothing on this systemd version)."""
    broken = unit_dir / "vfiouser-net.service"
    broken.write_text(
        broken.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomee=yes")
    )
    rc, lines = run_verify(systemd_analyze, broken)
    assert any("ProtectHomee" in line for line in lines), lines
    missing = unit_dir / "vfiouser-net@.service"
    missing.write_text(missing.read_text().replace(str(venv_binary()), "/nonexistent/vn"))
    rc, lines = run_verify(systemd_analyze, unit_dir / "vfiouser-net@vm1.service")
    assert rc != 0 and any("/nonexistent/vn" in line for line in lines), lines


@pytest.mark.parametrize(
    "unit", ["vfiouser-net@vm1.service", "vfiouser-net@vm1.socket", "vfiouser-net.service"]
)
def test_systemd_analyze_verify(systemd_analyze: str, unit_dir: Path, unit: str) -> None:
    rc, lines = run_verify(systemd_analyze, unit_dir / unit)
    assert rc == 0 and not lines, "\n".join(lines)


@pytest.mark.parametrize("unit", ["vfiouser-net@vm1.service", "vfiouser-net.service"])
def test_systemd_analyze_security(systemd_analyze: str, unit_dir: Path, unit: str) -> None:
    proc = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(unit_dir / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert m is not None, output
    assert float(m.group(1)) <= MAX_EXPOSURE, output


def _entries(path: Path) -> dict[str, list[str]]:
    """/etc/passwd or /etc/group by name."""
    return {e[0]: e for e in (line.split(":") for line in path.read_text().splitlines())}


def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    """In a scratch root: sysusers makes the user and the groups, tmpfiles then makes
    /run/vfiouser-net vfiouser-net:kvm, setgid, no access for others."""
    sysusers = _tool("systemd-sysusers", "systemd")
    tmpfiles = _tool("systemd-tmpfiles", "systemd")
    if os.geteuid() != 0:
        require(False, "needs root (systemd-tmpfiles --root chowns)")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for tool, conf in ((sysusers, SYSUSERS), (tmpfiles, TMPFILES)):
        args = [tool, f"--root={root}"]
        if tool == tmpfiles:
            args.append("--create")
        proc = subprocess.run(
            [*args, "-"],
            input=conf.read_text(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, f"{conf}: {proc.stdout}{proc.stderr}"
    users = _entries(root / "etc/passwd")
    groups = _entries(root / "etc/group")
    assert SERVICE_USER in users and SERVICE_USER in groups and QEMU_GROUP in groups
    assert users[SERVICE_USER][6] in ("/usr/sbin/nologin", "/sbin/nologin")
    st = (root / RUN_DIR.lstrip("/")).stat()
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o2750
    assert st.st_uid == int(users[SERVICE_USER][2])
    assert st.st_gid == int(groups[QEMU_GROUP][2])


# -- the units' settings ------------------------------------------------------------------


def words(unit: UnitFile, section: str, key: str) -> set[str]:
    return {w for value in unit.values(section, key) for w in value.split()}


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_service_hardening(path: Path) -> None:
    unit = parse_unit(path)
    s = "Service"
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "User": SERVICE_USER,
        "DevicePolicy": "closed",
        "UMask": "0007",
        # Captures (ctl capture --file) need a writable place that outlives the service.
        "StateDirectory": SERVICE_USER,
    }
    for key, want in expected.items():
        assert unit.value(s, key) == want, f"{path.name}: {key}={unit.value(s, key)}"
    assert words(unit, s, "RestrictAddressFamilies") == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    assert words(unit, s, "CapabilityBoundingSet") == {"CAP_NET_ADMIN"}
    assert words(unit, s, "AmbientCapabilities") == {"CAP_NET_ADMIN"}
    assert [v.split()[0] for v in unit.values(s, "DeviceAllow")] == ["/dev/net/tun"]
    # /run/vfiouser-net belongs to tmpfiles.d: a RuntimeDirectory= would delete it (and
    # every socket unit's socket in it) when the service stops.
    assert not {k for k in unit.keys(s) if k.startswith("RuntimeDirectory")}
    assert unit.values(s, "ReadWritePaths") == [RUN_DIR]
    # The admin channel reads a connecting ctl's /proc/PID/status for its groups.
    assert unit.value(s, "ProtectProc") in (None, "default")
    assert unit.value(s, "Restart") == "on-failure"
    # Budgets that bound what a hostile client or guest can exhaust.
    assert int(unit.value(s, "LimitNOFILE") or 0) >= 1024
    assert (unit.value(s, "MemoryMax") or "").rstrip("MG").isdigit()
    pre = exec_argv(unit, "ExecStartPre", "vm1" if "@" in path.name else "", {})
    assert [argv[-2:] for argv in pre] == [["--create", TMPFILES.name]]
    assert unit.values(s, "ExecStartPre")[0].startswith("+"), "tmpfiles runs unsandboxed"


def test_socket_unit() -> None:
    unit = parse_unit(INSTANCE_SOCKET)
    s = "Socket"
    assert unit.values(s, "ListenStream") == [f"{RUN_DIR}/%i.sock"]
    assert unit.value(s, "SocketMode") == "0660"
    assert unit.value(s, "SocketUser") == SERVICE_USER
    assert unit.value(s, "SocketGroup") == QEMU_GROUP
    assert unit.value(s, "Accept") in (None, "no", "false")
    assert unit.value(s, "Service") in (None, "vfiouser-net@%i.service")
    assert unit.value(s, "RemoveOnStop") == "yes"
    assert unit.values("Install", "WantedBy") == ["sockets.target"]


def test_instance_service_is_socket_activated() -> None:
    unit = parse_unit(INSTANCE_SERVICE)
    assert "vfiouser-net@%i.socket" in words(unit, "Unit", "Requires")
    assert "vfiouser-net@%i.socket" in words(unit, "Unit", "After")
    assert unit.values("Service", "EnvironmentFile") == ["-/etc/vfiouser-net/%i.env"]
    env = service_environment(unit, "vm1")
    assert env["TAP"] == "tap-vm1"
    [argv] = exec_argv(unit, "ExecStart", "vm1", env)
    assert argv[0] == INSTALLED_BINARY
    assert "serve" in argv and "--socket-path" not in argv and "--config" not in argv
    assert argv[argv.index("--tap") + 1] == "tap-vm1"
    assert argv[argv.index("--name") + 1] == "vm1"


def test_host_service_command_line() -> None:
    unit = parse_unit(HOST_SERVICE)
    [argv] = exec_argv(unit, "ExecStart", "", {})
    assert argv[0] == INSTALLED_BINARY
    assert argv[argv.index("--config") + 1] == "/etc/vfiouser-net/vfiouser-net.toml"
    assert argv[argv.index("--admin-socket") + 1] == f"{RUN_DIR}/admin.sock"
    assert unit.values("Install", "WantedBy") == ["multi-user.target"]


def test_files_agree_with_each_other() -> None:
    """User, groups, directory and names the same in every file."""
    tmpfiles = [line.split() for line in TMPFILES.read_text().splitlines() if line[:1] == "d"]
    assert tmpfiles == [["d", RUN_DIR, "2750", SERVICE_USER, QEMU_GROUP, "-"]]
    sysusers = [line.split()[:2] for line in SYSUSERS.read_text().splitlines() if line[:1] in "ug"]
    assert ["u", SERVICE_USER] in sysusers and ["g", QEMU_GROUP] in sysusers
    for path in SERVICES:
        unit = parse_unit(path)
        assert unit.value("Service", "Group") == SERVICE_USER
        [argv] = exec_argv(unit, "ExecStart", "vm1" if "@" in path.name else "", {})
        assert argv[argv.index("--admin-group") + 1] == SERVICE_USER
        assert argv[argv.index("--admin-socket") + 1].startswith(f"{RUN_DIR}/")
        # Captures go to the service's own state directory, and only there.
        state = unit.value("Service", "StateDirectory")
        assert argv[argv.index("--capture-dir") + 1] == f"/var/lib/{state}"
    host_cfg = load_example_toml()
    for dev in host_cfg.devices:
        assert dev.socket_path.startswith(f"{RUN_DIR}/")


# -- command lines as the daemon parses them ---------------------------------------------


@pytest.fixture
def activated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Socket activation as systemd sets it up for this process."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    yield


@pytest.mark.parametrize("env_file", [None, ENV_EXAMPLE], ids=["defaults", "env-example"])
def test_instance_command_line_parses(activated: None, env_file: Path | None) -> None:
    unit = parse_unit(INSTANCE_SERVICE)
    files = {"/etc/vfiouser-net/vm1.env": env_file} if env_file else {}
    env = service_environment(unit, "vm1", files)
    [argv] = exec_argv(unit, "ExecStart", "vm1", env)
    args = cli.build_parser().parse_args(argv[1:])
    cfg = cli.daemon_config(args)
    [dev] = cfg.devices
    assert dev.listen_fd == cli.SD_LISTEN_FDS_START
    assert dev.socket_path == ""
    assert dev.name == "vm1"
    assert cfg.admin_socket == f"{RUN_DIR}/vm1.admin.sock"
    if env_file is None:
        assert dev.tap == "tap-vm1"
        assert cfg.metrics_addr == "none"
    else:
        example = read_environment_file(env_file)
        assert set(example) <= {"TAP", "METRICS_ADDR", "LOG_LEVEL", "OPTIONS"}
        assert dev.tap == example["TAP"]
        assert cfg.metrics_addr == example["METRICS_ADDR"]
        assert args.log_level == example["LOG_LEVEL"]
        assert dev.mac == bytes.fromhex("525400000001")


def test_host_command_line_parses() -> None:
    unit = parse_unit(HOST_SERVICE)
    [argv] = exec_argv(unit, "ExecStart", "", {})
    argv = [str(TOML_EXAMPLE) if a.startswith("/etc/vfiouser-net/") else a for a in argv]
    cfg = cli.daemon_config(cli.build_parser().parse_args(argv[1:]))
    assert [d.name for d in cfg.devices] == ["vm1", "vm2"]
    assert cfg.admin_socket == f"{RUN_DIR}/admin.sock"
    assert cfg.admin_group == SERVICE_USER
    assert cli.capture_dir(cfg) == f"/var/lib/{SERVICE_USER}"


# -- example configuration -----------------------------------------------------------------


def load_example_toml() -> DaemonConfig:
    return load_config(TOML_EXAMPLE)


def test_example_toml_loads() -> None:
    cfg = load_example_toml()
    assert cfg.admin_socket == f"{RUN_DIR}/admin.sock"
    assert cfg.metrics_addr == "127.0.0.1:9742"
    assert len(cfg.devices) == 2
    names = [d.name for d in cfg.devices]
    assert len(set(names)) == len(names)
    assert len({d.tap for d in cfg.devices}) == len(cfg.devices)
    assert any(d.queue_pairs > 1 for d in cfg.devices), "show a multiqueue device"
    for dev in cfg.devices:
        dev.validate()


# -- libvirt ---------------------------------------------------------------------------------


def device_json(args: list[str]) -> dict[str, object]:
    """The JSON after the only -device in args whose driver is vfio-user-pci."""
    found: list[dict[str, object]] = []
    for i, arg in enumerate(args[:-1]):
        if arg == "-device" and args[i + 1].lstrip().startswith("{"):
            spec: dict[str, object] = json.loads(args[i + 1])
            if spec.get("driver") == "vfio-user-pci":
                found.append(spec)
    assert len(found) == 1, args
    return found[0]


def check_device_spec(spec: dict[str, object], name: str) -> None:
    assert spec["driver"] == "vfio-user-pci"
    assert spec["socket"] == {"path": f"{RUN_DIR}/{name}.sock", "type": "unix"}
    assert isinstance(spec.get("id"), str)


def test_libvirt_domain() -> None:
    text = LIBVIRT_DOMAIN.read_text()
    assert f"xmlns:qemu='{QEMU_NS}'" in text or f'xmlns:qemu="{QEMU_NS}"' in text
    domain = ET.parse(LIBVIRT_DOMAIN).getroot()
    assert domain.tag == "domain"
    name = domain.findtext("name")
    assert name
    backing = domain.find("memoryBacking")
    assert backing is not None
    source, access = backing.find("source"), backing.find("access")
    assert source is not None and source.get("type") == "memfd"
    assert access is not None and access.get("mode") == "shared"
    os_type = domain.find("os/type")
    assert os_type is not None and os_type.get("machine", "").startswith("q35")
    commandline = domain.findall(f"{{{QEMU_NS}}}commandline")
    assert len(commandline) == 1
    args = [a.get("value", "") for a in commandline[0].findall(f"{{{QEMU_NS}}}arg")]
    check_device_spec(device_json(args), name)


def test_libvirt_domain_schema() -> None:
    """libvirt's own RelaxNG schema (libvirt-clients + libxml2-utils), when installed."""
    validate = _tool("virt-xml-validate", "libvirt-clients")
    _tool("xmllint", "libxml2-utils")
    proc = subprocess.run(
        [validate, str(LIBVIRT_DOMAIN), "domain"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- QEMU example -------------------------------------------------------------------------------


def run_qemu_example(tmp_path: Path, env: dict[str, str], *extra: str) -> list[str]:
    """Run the example with a stand-in QEMU that records its argv."""
    record = tmp_path / "argv.json"
    fake = tmp_path / "fake-qemu"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "QEMU": str(fake), **env}
    proc = subprocess.run(
        ["sh", str(QEMU_EXAMPLE), *extra],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    argv: list[str] = json.loads(record.read_text())
    return argv


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


def test_qemu_example_command_line(tmp_path: Path) -> None:
    argv = run_qemu_example(tmp_path, {})
    check_device_spec(device_json(argv), "vm1")
    [machine] = option_values(argv, "-machine")
    assert machine.split(",")[0] == "q35"
    backend = dict(p.partition("=")[::2] for p in machine.split(",")[1:])["memory-backend"]
    objects = [o for o in option_values(argv, "-object") if o.startswith("memory-backend-memfd,")]
    assert len(objects) == 1
    props = dict(p.partition("=")[::2] for p in objects[0].split(",")[1:])
    assert props["id"] == backend
    assert props["share"] == "on"
    assert props["size"] == option_values(argv, "-m")[0]
    assert len(option_values(argv, "-drive")) == 1


def test_qemu_example_settings(tmp_path: Path) -> None:
    argv = run_qemu_example(
        tmp_path, {"NAME": "vm7", "DISK": "", "MEMORY": "512M"}, "-kernel", "/boot/vmlinuz"
    )
    check_device_spec(device_json(argv), "vm7")
    assert option_values(argv, "-drive") == []
    assert argv[-2:] == ["-kernel", "/boot/vmlinuz"]
    assert "size=512M" in option_values(argv, "-object")[0]


def test_qemu_example_shellcheck() -> None:
    shellcheck = _tool("shellcheck", "shellcheck")
    proc = subprocess.run(
        [shellcheck, "-s", "sh", str(QEMU_EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout


# -- README ----------------------------------------------------------------------------------------


def test_readme_mentions_existing_files() -> None:
    """Every deploy/ path the operator's guide names exists, and every file is explained."""
    text = DEPLOY_README.read_text()
    named = set(re.findall(r"deploy/[\w./@-]*[\w@]", text))
    for path in named:
        assert (ROOT / path).exists(), f"deploy/README.md names {path}, which does not exist"
    for path in [
        INSTANCE_SERVICE,
        INSTANCE_SOCKET,
        HOST_SERVICE,
        ENV_EXAMPLE,
        TMPFILES,
        SYSUSERS,
        TOML_EXAMPLE,
        QEMU_EXAMPLE,
        LIBVIRT_DOMAIN,
    ]:
        assert str(path.relative_to(ROOT)) in named, f"deploy/README.md does not mention {path}"
