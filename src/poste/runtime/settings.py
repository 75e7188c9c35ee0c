"""Each setting of a service, written once: key, kind, default and help.

A service's flags (`runtime/command.py` makes the click options), its
section of `poste up`'s TOML (`stack/config.py` checks the keys and types),
the defaults both see, and the table in docs/settings.md all come from the
same `Setting` list, so a flag and its key cannot drift apart.  Builders get
one `Values` mapping, whichever front end filled it, and complain with a
`ConfigError` that each front end phrases its own way.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# kinds: how a value is written and what the builder gets
STR, STRS, PATH, FILE, DIR, FILES, INT, FLOAT, FLAG, DURATION, CHOICE, COUNT, PROCS = (
    "str", "strs", "path", "file", "dir", "files", "int", "float", "flag", "duration",
    "choice", "count", "procs",
)
MULTIPLE = (STRS, FILES)
PATHS = (PATH, FILE, DIR, FILES)

_UNSET: Any = object()


class ConfigError(Exception):
    """A setting that cannot be used, said without knowing whether it came from a flag or a key.

    `key` names the one setting at fault (the CLI says `--key`, the TOML
    loader `[section] key`).  When several are, `message` holds `{0}`,
    `{1}`... for `names`, so each front end spells them (`--tls-cert` or
    `tls-cert`); `usage` says whether the fault is how they were combined
    (by default: when `names` are given; not for a file that cannot be read).  Without either, the message stands alone.
    """

    def __init__(
        self, key: str | None, message: str, *, names: Sequence[str] = (),
        usage: bool | None = None,
    ) -> None:
        self.key = key
        self.message = message
        self.names = tuple(names)
        # how the settings were combined is wrong (the CLI: a usage error, exit status 2)
        self.usage = bool(names) if usage is None else usage
        super().__init__(self.render(lambda name: name))

    def text(self, spell: Callable[[str], str]) -> str:
        """The message with each of `names` spelled by `spell`."""
        return self.message.format(*(spell(n) for n in self.names)) if self.names else self.message

    def render(self, spell: Callable[[str], str]) -> str:
        """`key: message` (the TOML loader puts the section before it)."""
        return f"{self.key}: {self.text(spell)}" if self.key else self.text(spell)


@dataclass(frozen=True)
class Setting:
    """One flag of a service command, and the key of the same name in its `poste up` section."""

    key: str
    kind: str = STR
    default: Any = None
    help: str | None = None
    metavar: str | None = None
    required: bool = False  # on the command line; `poste up` fills it from elsewhere
    short: str | None = None
    envvar: str | None = None
    show_default: bool = False
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    cli: bool = True  # a flag of the service's command
    stack: bool = True  # a key of its `poste up` section
    stack_default: Any = _UNSET  # when `poste up` defaults differently (its listeners)
    stack_note: str | None = None  # why `poste up` refuses the key (with stack=False)

    def but(self, **changes: Any) -> Setting:
        """The shared declaration with a service's own help, default...; the key stays."""
        return dataclasses.replace(self, **changes)

    @property
    def name(self) -> str:
        """The Python name a command's keyword argument gets."""
        return self.key.replace("-", "_")

    def initial(self, stack: bool = False) -> Any:
        """The default as a builder sees it (durations in seconds, lists as lists)."""
        value = self.stack_default if stack and self.stack_default is not _UNSET else self.default
        if value is None:
            return [] if self.kind in MULTIPLE else None
        if self.kind == DURATION and isinstance(value, str):
            return parse_duration(value)
        return list(value) if self.kind in MULTIPLE else value

    def check_range(self, value: Any) -> str | None:
        """Why a number is out of bounds (the words click's ranges use), or None."""
        if self.kind not in (INT, FLOAT) or value is None:
            return None
        low, high = self.min, self.max
        if (low is None or value >= low) and (high is None or value <= high):
            return None
        def fmt(v: float) -> str:
            return str(int(v)) if self.kind == INT else str(float(v))

        if low is not None and high is not None:
            bounds = f"{fmt(low)}<=x<={fmt(high)}"
        elif low is not None:
            bounds = f"x>={fmt(low)}"
        else:
            assert high is not None
            bounds = f"x<={fmt(high)}"
        return f"{value} is not in the range {bounds}."


Values = Mapping[str, Any]


def defaults(settings: Sequence[Setting], stack: bool = False) -> dict[str, Any]:
    return {s.key: s.initial(stack) for s in settings}


def find(settings: Sequence[Setting], key: str) -> Setting:
    return next(s for s in settings if s.key == key)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds from 300, "300s", "5m", "4h", "5d", "200ms"; ValueError with a one-line reason."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration (e.g. 30s, 5m, 4h, 5d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


MAX_WORKERS = 64


def parse_workers(value: object) -> int:
    """A number of worker processes from `N` or `auto` (one per core this process may
    use); ValueError with a one-line reason."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        import os

        return max(1, len(os.sched_getaffinity(0)))
    if isinstance(value, bool):
        raise ValueError(f"expected a number of workers or auto, got {value!r}")
    try:
        n = int(str(value).strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of workers or auto, got {value!r}") from None
    if not 1 <= n <= MAX_WORKERS:
        raise ValueError(f"{n} is not in the range 1<=x<={MAX_WORKERS}.")
    return n


# -- settings every service spells the same way -----------------------------

LISTEN = Setting(
    "listen", default="127.0.0.1:2525", show_default=True, metavar="ADDR:PORT",
    help="Address and port to listen on.",
)
DESTINATION = Setting(
    "destination", required=True, metavar="HOST[:PORT]", help="Next hop (port 25 when omitted).",
    stack=False,  # `poste up` chains its services in memory
)
HOSTNAME = Setting(
    "hostname", metavar="NAME",
    help="Our name in the banner and in Received: (default: the machine's FQDN).",
)
TLS_CERT = Setting("tls-cert", FILE, help="PEM certificate.")
TLS_KEY = Setting("tls-key", FILE, help="PEM private key.")
# ACME (docs/deploy.md): the TLS certificate obtained and renewed by DNS-01 instead of
# tls-cert/tls-key; the verifier's and submission's, and `poste cert`'s.
ACME = (
    Setting("acme-directory", metavar="URL",
            help="ACME directory to obtain and renew the TLS certificate from by DNS-01"
                 " (instead of tls-cert/tls-key)."),
    Setting("acme-email", metavar="ADDR", help="Contact address of the ACME account."),
    Setting("acme-state", PATH, metavar="DIR",
            help="Folder of the ACME account and certificate (`poste up`: acme/ beside the"
                 " relay's spool)."),
    Setting("acme-name", STRS, metavar="NAME",
            help="A name on the certificate (repeatable; default: hostname)."),
    Setting("acme-dns-server", metavar="IP[:PORT]",
            help="Primary DNS server taking the _acme-challenge records (RFC 2136)."),
    Setting("acme-dns-key", metavar="NAME:ALG:SECRET", help="TSIG key allowed to update it."),
    Setting("acme-zone", metavar="ZONE",
            help="Zone of the challenge records (default: the one the primary names)."),
    Setting("acme-ca", FILE,
            help="CA file for the ACME server's HTTPS certificate (a private or test CA)."),
    Setting("acme-challenge", CHOICE, default="dns-01", choices=("dns-01", "http-01"),
            show_default=True,
            help="dns-01: TXT records through acme-dns-server; http-01: a responder on"
                 " acme-http-listen while an order waits (a DNS without UPDATE)."),
    Setting("acme-http-listen", metavar="ADDR:PORT", default="0.0.0.0:80", show_default=True,
            help="Where the HTTP-01 responder listens (port 80 of the names, for the CA)."),
)
NAMESERVER = Setting("nameserver", STRS, metavar="[tcp:|udp:]IP[:PORT]")
VERBOSE = Setting("verbose", COUNT, default=0, short="-v", help="More logging (-vv: debug).")
LOG_FORMAT = Setting(
    "log-format", CHOICE, default="plain", choices=("plain", "json"), envvar="POSTE_LOG_FORMAT",
    show_default=True, help="Log lines as plain text or one JSON object each.",
)
METRICS = Setting(
    "metrics", metavar="ADDR:PORT", envvar="POSTE_METRICS",
    help="Serve Prometheus metrics at http://ADDR:PORT/metrics.",
)
WORKERS = Setting(
    "workers", PROCS, default="auto", metavar="N|auto", envvar="POSTE_WORKERS",
    show_default=True,
    help="Worker processes sharing the listening sockets (auto: one per core;"
         " docs/architecture.md).",
)
# What every service command ends with; `poste up` has them once, at the top of its file.
OPERATIONS = (VERBOSE.but(stack=False), LOG_FORMAT.but(stack=False), METRICS.but(stack=False),
              WORKERS.but(stack=False))
