"""Read systemd unit files as far as the tests of deploy/systemd need.

:func:`parse_unit` reads sections and their (repeatable) settings with
comments and line continuations; :func:`expand_specifiers` expands ``%i``,
``%I``, ``%n``, ``%N``, ``%p`` and ``%%``; :func:`service_environment`
collects ``Environment=`` and then ``EnvironmentFile=`` (which overrides it,
as in systemd); :func:`exec_argv` turns an ``Exec*=`` line into an argv the
way systemd does: prefixes (``-+!:@``) dropped, words split with quotes,
``${VAR}`` substituted inside a word, ``$VAR`` standing alone as a word split
at whitespace into zero or more words.

This is no systemd: ``systemd-analyze verify`` checks the files for real;
this lets the tests run the exact command lines and sandbox settings of the
units.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR_WORD = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")
_VAR_BRACED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class UnitError(ValueError):
    pass


@dataclass
class UnitFile:
    path: Path
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def values(self, section: str, key: str) -> list[str]:
        """Every value of key in section, in order (an empty value resets the list)."""
        out: list[str] = []
        for k, v in self.sections.get(section, []):
            if k == key:
                if v == "":
                    out = []
                else:
                    out.append(v)
        return out

    def value(self, section: str, key: str) -> str | None:
        """The last value of key (what systemd uses for single-valued settings)."""
        found = [v for k, v in self.sections.get(section, []) if k == key]
        return found[-1] if found else None

    def keys(self, section: str) -> set[str]:
        return {k for k, _ in self.sections.get(section, [])}


def parse_unit(path: Path) -> UnitFile:
    unit = UnitFile(path)
    section: str | None = None
    pending = ""
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.sections.setdefault(section, [])
            continue
        if section is None:
            raise UnitError(f"{path}:{lineno}: setting outside a section")
        key, sep, value = line.partition("=")
        if not sep:
            raise UnitError(f"{path}:{lineno}: not a KEY=VALUE line: {raw!r}")
        unit.sections[section].append((key.strip(), value.strip()))
    return unit


def _unescape_instance(instance: str) -> str:
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), instance).replace(
        "-", "/"
    )


def expand_specifiers(text: str, unit_name: str, instance: str = "") -> str:
    """%i, %I, %n, %N, %p and %% of unit_name (e.g. "vfiouser-net@vm1.service")."""
    stem = unit_name.rpartition(".")[0]
    prefix = stem.split("@", 1)[0]
    table = {
        "i": instance,
        "I": _unescape_instance(instance),
        "n": unit_name,
        "N": stem,
        "p": prefix,
        "%": "%",
    }

    def repl(m: re.Match[str]) -> str:
        spec = m.group(1)
        if spec not in table:
            raise UnitError(f"specifier %{spec} not supported here")
        return table[spec]

    return re.sub(r"%(.)", repl, text)


def instance_name(template: UnitFile, instance: str) -> str:
    """vfiouser-net@.service + vm1 -> vfiouser-net@vm1.service."""
    stem, dot, suffix = template.name.rpartition(".")
    if not stem.endswith("@"):
        if instance:
            raise UnitError(f"{template.name} is not a template")
        return template.name
    return f"{stem}{instance}{dot}{suffix}"


def read_environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads them (comments, optional quotes)."""
    env: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise UnitError(f"{path}:{lineno}: not a KEY=VALUE line: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def service_environment(
    unit: UnitFile,
    instance: str = "",
    env_files: dict[str, Path] | None = None,
) -> dict[str, str]:
    """Environment= assignments, then EnvironmentFile= (a path mapped through env_files
    to the file standing in for it; "-" paths that are not mapped are skipped)."""
    name = instance_name(unit, instance)
    env: dict[str, str] = {}
    for value in unit.values("Service", "Environment"):
        for assignment in shlex.split(expand_specifiers(value, name, instance)):
            key, sep, val = assignment.partition("=")
            if not sep:
                raise UnitError(f"{unit.path}: bad Environment= assignment {assignment!r}")
            env[key] = val
    for value in unit.values("Service", "EnvironmentFile"):
        optional = value.startswith("-")
        path = expand_specifiers(value.lstrip("-"), name, instance)
        stand_in = (env_files or {}).get(path)
        if stand_in is None:
            if optional:
                continue
            raise UnitError(f"{unit.path}: EnvironmentFile {path} is required")
        env.update(read_environment_file(stand_in))
    return env


def exec_argv(unit: UnitFile, key: str, instance: str, env: dict[str, str]) -> list[list[str]]:
    """Every command of an Exec*= setting (e.g. "ExecStart") as an argv."""
    name = instance_name(unit, instance)
    commands = []
    for line in unit.values("Service", key):
        words = shlex.split(expand_specifiers(line, name, instance))
        if not words:
            continue
        words[0] = words[0].lstrip("-+!:@")
        argv: list[str] = []
        for word in words:
            m = _VAR_WORD.match(word)
            if m is not None:
                argv.extend(env.get(m.group(1), "").split())
                continue
            argv.append(_VAR_BRACED.sub(lambda mm: env.get(mm.group(1), ""), word))
        commands.append(argv)
    return commands
