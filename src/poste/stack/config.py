"""The `poste up` configuration: TOML, one section per service, keys named as the flags.

A key written `tls-cert` or `tls_cert` is the service's `--tls-cert` flag.
Keys at the top of the file (before any section) are defaults for every
section that has a flag of that name, so `domain`, `hostname`,
`nameserver`, `tls-cert`... are written once.  Relative paths are relative to
the config file's folder, so a directory made by `poste init` can be moved.
Every error is one line naming the file, the section and the key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVICES = ("verifier", "spamfilter", "relay", "submission", "signer")


class ConfigError(ValueError):
    """A config file that cannot be used (one-line reason)."""


# value kinds
STR, STRS, PATH, PATHS, INT, FLOAT, BOOL, DURATION = (
    "str", "strs", "path", "paths", "int", "float", "bool", "duration",
)

_COMMON: dict[str, str] = {"enabled": BOOL, "destination": STR, "verbose": INT}

SCHEMA: dict[str, dict[str, str]] = {
    # keys valid before any section; also shared defaults for the sections below
    "": {
        "domain": STRS,
        "hostname": STR,
        "postmaster": STR,
        "nameserver": STRS,
        "tls-cert": PATH,
        "tls-key": PATH,
        "users": PATH,
        "metrics": STR,
        "log-format": STR,
        "verbose": INT,
    },
    "verifier": {
        "domain": STRS,
        "postmaster": STR,
        "listen": STR,
        "tls-cert": PATH,
        "tls-key": PATH,
        "nameserver": STRS,
        "dns-timeout": FLOAT,
        "psl": PATH,
        "hostname": STR,
        "require-tls": BOOL,
        "reject-failures": BOOL,
    },
    "spamfilter": {
        "listen": STR,
        "db": PATH,
        "hostname": STR,
        "header-name": STR,
        "detail": BOOL,
        "ham-cutoff": FLOAT,
        "spam-cutoff": FLOAT,
    },
    "relay": {
        "domain": STRS,
        "postmaster": STR,
        "users": PATH,
        "spool": PATH,
        "listen": STR,
        "nameserver": STRS,
        "smtp-port": INT,
        "granted": STRS,
        "srs-secret": STR,
        "srs-secret-file": PATH,
        "hostname": STR,
        "retry-min": DURATION,
        "retry-max": DURATION,
        "lifetime": DURATION,
        "warn-after": DURATION,
        "domain-concurrency": INT,
        "queue-rescan": DURATION,
        "users-poll": DURATION,
        "max-received": INT,
        "no-ipv6": BOOL,
        "self-address": STRS,
        # not a flag of `poste relay`: deliver everything into this folder (demo, tests)
        "mailbox": PATH,
    },
    "submission": {
        "domain": STRS,
        "users": PATH,
        "tls-cert": PATH,
        "tls-key": PATH,
        "listen-tls": STR,
        "listen": STR,
        "hostname": STR,
        "poll-interval": FLOAT,
        "auth-delay": FLOAT,
        "auth-max-delay": FLOAT,
        "auth-max-failures": INT,
        "auth-net-failures": INT,
        "auth-account-failures": INT,
        "auth-state": PATH,
        "auth-lockout": FLOAT,
        "auth-concurrency": INT,
    },
    "signer": {
        "domain": STR,
        "selector": STRS,
        "private-key": PATHS,
        "listen": STR,
        "hostname": STR,
        "dns-server": STR,
        "dns-key": STR,
        "zone": STR,
        "sign-headers": STR,
        "oversign": STR,
    },
}

LOG_FORMATS = ("plain", "json")


@dataclass
class Section:
    """One service's settings, after defaults and path resolution."""

    name: str
    values: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.values.get(key)
        return default if value is None else value

    def need(self, key: str) -> Any:
        value = self.values.get(key)
        if value is None or value == [] or value == "":
            raise ConfigError(f"[{self.name}] needs `{key}`")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.values.get("enabled", True))


@dataclass
class StackConfig:
    path: Path | None
    top: dict[str, Any]
    sections: dict[str, Section]

    def __getitem__(self, name: str) -> Section:
        return self.sections[name]

    @property
    def metrics(self) -> str | None:
        value = self.top.get("metrics")
        return str(value) if value else None

    @property
    def log_format(self) -> str:
        return str(self.top.get("log-format") or "plain")


def _convert(kind: str, value: Any, where: str, base: Path) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: expected {expected}, got {value!r}")

    if kind == STR:
        if not isinstance(value, str):
            raise bad("a string (in quotes)")
        return str(value)
    if kind in (STRS, PATHS):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise bad("a string or a list of strings")
        if kind == PATHS:
            return [str((base / v).expanduser()) if v else v for v in items]
        return list(items)
    if kind == PATH:
        if not isinstance(value, str) or not value:
            raise bad("a path")
        return str(base / Path(value).expanduser())
    if kind == INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if kind == BOOL:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == DURATION:
        return _duration(value, where)
    raise AssertionError(kind)


def _duration(value: Any, where: str) -> float:
    """Seconds from 300, "300s", "5m", "4h", "5d", "200ms" (the relay's flag syntax)."""
    import re

    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", str(value))
    if not m:
        raise ConfigError(f"{where}: {value!r} is not a duration (e.g. 30s, 5m, 4h, 5d)")
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    return float(m.group(1)) * units[m.group(2) or "s"]


def _normal(key: str) -> str:
    return key.strip().lower().replace("_", "-")


def _close(word: str, choices: list[str]) -> str:
    import difflib

    near = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean `{near[0]}`?)" if near else ""


def parse(data: Mapping[str, Any], path: Path | None = None) -> StackConfig:
    """Validate a parsed TOML document; raises ConfigError."""
    name = str(path) if path else "config"
    base = path.resolve().parent if path else Path.cwd()
    top: dict[str, Any] = {}
    raw_sections: dict[str, Mapping[str, Any]] = {}
    for key, value in data.items():
        k = _normal(key)
        if isinstance(value, Mapping):
            if k not in SERVICES:
                raise ConfigError(
                    f"{name}: unknown section [{key}]{_close(k, list(SERVICES))}"
                    f" (sections: {', '.join(SERVICES)})"
                )
            raw_sections[k] = value
            continue
        kinds = SCHEMA[""]
        if k not in kinds:
            raise ConfigError(f"{name}: unknown top-level key `{key}`{_close(k, list(kinds))}")
        top[k] = _convert(kinds[k], value, f"{name}: `{key}`", base)
    fmt = top.get("log-format")
    if fmt is not None and fmt not in LOG_FORMATS:
        raise ConfigError(f"{name}: `log-format` must be plain or json, got {fmt!r}")
    sections: dict[str, Section] = {}
    for service in SERVICES:
        kinds = {**_COMMON, **SCHEMA[service]}
        values: dict[str, Any] = {}
        for key, value in raw_sections.get(service, {}).items():
            k = _normal(key)
            if isinstance(value, Mapping):
                raise ConfigError(f"{name}: [{service}] `{key}` must not be a table")
            if k not in kinds:
                raise ConfigError(
                    f"{name}: [{service}] unknown key `{key}`{_close(k, list(kinds))}"
                )
            values[k] = _convert(kinds[k], value, f"{name}: [{service}] `{key}`", base)
        for k, v in top.items():
            if k in kinds and k not in values:
                kind = kinds[k]
                if kind == STR and isinstance(v, list):  # domain = [...] at the top, one wanted
                    v = v[0] if v else None
                values[k] = v
        sections[service] = Section(service, values)
    _check_pairs(name, sections)
    return StackConfig(path, top, sections)


def _check_pairs(name: str, sections: dict[str, Section]) -> None:
    signer = sections["signer"]
    sel, keys = signer.get("selector", []), signer.get("private-key", [])
    if signer.enabled and len(sel) != len(keys):
        raise ConfigError(
            f"{name}: [signer] {len(sel)} selector(s) for {len(keys)} private-key(s):"
            " give one selector per key"
        )


def load(path: str | Path) -> StackConfig:
    """Read and validate a config file; every failure is a one-line ConfigError."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file (make one with `poste init DIR`)") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: TOML error: {exc}") from None
    return parse(data, p)


def toml_value(value: Any) -> str:
    """A value as TOML text (what `poste init` writes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'

