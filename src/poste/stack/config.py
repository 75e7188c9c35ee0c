"""The `poste up` configuration: TOML, one section per service, its keys the service's settings.

A section's keys are the `Setting`s its service's command makes its flags of
(services/<name>/settings.py), with the same kinds, bounds and defaults: a
key written `tls-cert` or `tls_cert` is the service's `--tls-cert` flag.
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

from poste.runtime import settings as st
from poste.runtime.settings import ConfigError, Setting
from poste.services.relay.settings import SETTINGS as RELAY
from poste.services.signer.settings import SETTINGS as SIGNER
from poste.services.spamfilter.settings import SETTINGS as SPAMFILTER
from poste.services.submission.settings import SETTINGS as SUBMISSION
from poste.services.verifier.settings import SETTINGS as VERIFIER

__all__ = ["SECTIONS", "SERVICES", "TOP", "ConfigError", "Section", "StackConfig", "load", "parse"]

# Keys before any section: `poste up`'s own, and defaults for the sections below.
TOP: tuple[Setting, ...] = (
    Setting("domain", st.STRS, help="Our mail domains (the first is the users' default)."),
    st.HOSTNAME,
    Setting("postmaster", help="Where mail to postmaster@ goes."),
    st.NAMESERVER.but(help="DNS servers of every section that looks things up."),
    st.TLS_CERT,
    st.TLS_KEY,
    *st.ACME,
    Setting("users", st.PATH, help="The Git users repository."),
    st.METRICS,
    st.WORKERS.but(envvar=None),  # POSTE_WORKERS is `poste up --workers`'s
    st.LOG_FORMAT,
    Setting("verbose", st.INT, default=0, help="More logging (2: debug)."),
)
# Keys every section takes besides its service's settings.
COMMON: tuple[Setting, ...] = (
    Setting("enabled", st.FLAG, default=True,
            help="false: this service does not run (not the relay: mail rests there)."),
    Setting("verbose", st.INT, default=0, help="Accepted; the top-level `verbose` counts."),
    Setting("destination", help="Ignored: in `poste up` the hops are in memory."),
)
SECTIONS: dict[str, tuple[Setting, ...]] = {
    "verifier": VERIFIER, "spamfilter": SPAMFILTER, "relay": RELAY,
    "submission": SUBMISSION, "signer": SIGNER,
}
SERVICES = tuple(SECTIONS)


def keys_of(service: str) -> dict[str, Setting]:
    """The keys of a section: its service's settings `poste up` reads, and the common ones."""
    own = {s.key: s for s in SECTIONS[service] if s.stack}
    return {**{s.key: s for s in COMMON}, **own}


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
            raise ConfigError(None, f"[{self.name}] needs `{key}`")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.values.get("enabled", True))

    def settings(self) -> dict[str, Any]:
        """Every setting of the service, given or default, as its builder takes them."""
        return {**st.defaults(SECTIONS[self.name], stack=True), **self.values}

    def error(self, exc: ConfigError) -> ConfigError:
        """A builder's complaint, told as the key of this section: `[relay] listen: ...`."""
        return ConfigError(None, f"[{self.name}] {exc.render(lambda name: name)}")


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


def _convert(setting: Setting, value: Any, where: str, base: Path) -> Any:
    """A TOML value as the builder wants it, checked as the flag is (kind and range)."""
    kind = setting.kind

    def bad(expected: str) -> ConfigError:
        return ConfigError(None, f"{where}: expected {expected}, got {value!r}")

    if kind in (st.STR, st.CHOICE):
        if not isinstance(value, str):
            raise bad("a string (in quotes)")
        if kind == st.CHOICE and value not in setting.choices:
            raise ConfigError(None, f"{where} must be {' or '.join(setting.choices)}, got {value!r}")
        return str(value)
    if kind in (st.STRS, st.FILES):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise bad("a string or a list of strings")
        if kind == st.FILES:
            return [str((base / v).expanduser()) if v else v for v in items]
        return list(items)
    if kind in st.PATHS:
        if not isinstance(value, str) or not value:
            raise bad("a path")
        return str(base / Path(value).expanduser())
    if kind == st.PROCS:
        try:
            st.parse_workers(value)
        except ValueError as exc:
            raise ConfigError(None, f"{where}: {exc}") from None
        return value
    if kind in (st.INT, st.COUNT):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind == st.FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        value = float(value)
    elif kind == st.FLAG:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    elif kind == st.DURATION:
        try:
            return st.parse_duration(value)
        except ValueError as exc:
            raise ConfigError(None, f"{where}: {exc}") from None
    else:
        raise AssertionError(kind)
    out_of_range = setting.check_range(value)
    if out_of_range:
        raise ConfigError(None, f"{where}: {out_of_range.rstrip('.')}")
    return value


def _normal(key: str) -> str:
    return key.strip().lower().replace("_", "-")


def _close(word: str, choices: list[str]) -> str:
    import difflib

    near = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean `{near[0]}`?)" if near else ""


def _unknown(name: str, where: str, key: str, service: str | None) -> ConfigError:
    k = _normal(key)
    note = next((s.stack_note for s in SECTIONS.get(service or "", ()) if s.key == k and
                 s.stack_note), None)
    if note:
        return ConfigError(None, f"{name}: {where}`{key}` is not read by `poste up`: {note}")
    known = list(keys_of(service) if service else {s.key for s in TOP})
    what = "unknown key" if service else "unknown top-level key"
    return ConfigError(None, f"{name}: {where}{what} `{key}`{_close(k, known)}")


def parse(data: Mapping[str, Any], path: Path | None = None) -> StackConfig:
    """Validate a parsed TOML document; raises ConfigError."""
    name = str(path) if path else "config"
    base = path.resolve().parent if path else Path.cwd()
    top: dict[str, Any] = {}
    top_keys = {s.key: s for s in TOP}
    raw_sections: dict[str, Mapping[str, Any]] = {}
    for key, value in data.items():
        k = _normal(key)
        if isinstance(value, Mapping):
            if k not in SERVICES:
                raise ConfigError(
                    None,
                    f"{name}: unknown section [{key}]{_close(k, list(SERVICES))}"
                    f" (sections: {', '.join(SERVICES)})",
                )
            raw_sections[k] = value
            continue
        if k not in top_keys:
            raise _unknown(name, "", key, None)
        top[k] = _convert(top_keys[k], value, f"{name}: `{key}`", base)
    sections: dict[str, Section] = {}
    for service in SERVICES:
        kinds = keys_of(service)
        values: dict[str, Any] = {}
        for key, value in raw_sections.get(service, {}).items():
            k = _normal(key)
            if isinstance(value, Mapping):
                raise ConfigError(None, f"{name}: [{service}] `{key}` must not be a table")
            if k not in kinds:
                raise _unknown(name, f"[{service}] ", key, service)
            values[k] = _convert(kinds[k], value, f"{name}: [{service}] `{key}`", base)
        for k, v in top.items():
            if k in kinds and k not in values:
                if kinds[k].kind == st.STR and isinstance(v, list):
                    v = v[0] if v else None  # domain = [...] at the top, one wanted
                values[k] = v
        sections[service] = Section(service, values)
    _check_pairs(name, sections)
    return StackConfig(path, top, sections)


def _check_pairs(name: str, sections: dict[str, Section]) -> None:
    signer = sections["signer"]
    sel, keys = signer.get("selector", []), signer.get("private-key", [])
    if signer.enabled and len(sel) != len(keys):
        raise ConfigError(
            None,
            f"{name}: [signer] {len(sel)} selector(s) for {len(keys)} private-key(s):"
            " give one selector per key"
        )


def load(path: str | Path) -> StackConfig:
    """Read and validate a config file; every failure is a one-line ConfigError."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(None, f"{p}: no such file (make one with `poste init DIR`)") from None
    except OSError as exc:
        raise ConfigError(None, f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(None, f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(None, f"{p}: TOML error: {exc}") from None
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

