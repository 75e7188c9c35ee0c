"""`HOST[:PORT]` or `unix:PATH`, as every flag and config key writes it (one parser for all).

A unix socket comes back as (PATH, 0), PATH absolute: `SMTPService` listens
there and `SMTPHop` connects there.  It is how our own services prove that they
are ours (the relay lets mail that came in over a unix socket go anywhere; the
socket's folder decides who can open it), where an address proves nothing.
"""

from __future__ import annotations

from poste.runtime.settings import ConfigError


def parse_hostport(text: str, default_port: int, key: str | None = None) -> tuple[str, int]:
    """`HOST[:PORT]`, `[v6]:PORT`, `unix:/PATH`; a ConfigError naming `key`, with a
    one-line reason."""
    value = text.strip()
    if not value:
        raise ConfigError(key, "empty address")
    if value.startswith("unix:"):
        path = value[5:]
        if not path.startswith("/") or "\x00" in path:
            raise ConfigError(key, f"{text!r}: a unix socket needs an absolute path")
        return path, 0
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
