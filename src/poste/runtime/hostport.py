"""`HOST[:PORT]` as every flag and config key writes it (one parser for all of them)."""

from __future__ import annotations

from poste.runtime.settings import ConfigError


def parse_hostport(text: str, default_port: int, key: str | None = None) -> tuple[str, int]:
    """`HOST[:PORT]`, `[v6]:PORT`; a ConfigError naming `key`, with a one-line reason."""
    value = text.strip()
    if not value:
        raise ConfigError(key, "empty address")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(key, f"bad address {text!r}")
        port_text = rest[1:] if rest else ""
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, ""
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(key, f"bad port in {text!r}")
    return host, int(port_text)
