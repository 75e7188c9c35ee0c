"""The signer's keys and fields, shared by `poste signer`, `poste dkim sign` and `poste up`."""

from __future__ import annotations

from collections.abc import Sequence

from poste.dkim import keys as dkim_keys
from poste.dkim.sign import DEFAULT_HEADERS, DEFAULT_OVERSIGN, Signer, SigningKey, pair_keys
from poste.runtime.settings import ConfigError


def parse_field_list(text: str | None, default: Sequence[str]) -> tuple[str, ...]:
    """`From,To,Subject` -> the field names (the default when not given)."""
    if text is None:
        return tuple(default)
    return tuple(f.strip() for f in text.split(",") if f.strip())


def signing_keys(domain: str, selectors: Sequence[str], paths: Sequence[str]) -> list[SigningKey]:
    """Pair `--selector`/`--private-key` flags in order: one signature per key."""
    if not paths:
        raise ConfigError(None, "give at least one {0}", names=["private-key"])
    if len(selectors) != len(paths):
        raise ConfigError(None, f"{len(selectors)} {{0}} for {len(paths)} {{1}}:"
                          " give one selector per key", names=["selector", "private-key"])
    try:
        return pair_keys(domain, selectors, paths)
    except dkim_keys.DKIMKeyError as exc:
        raise ConfigError(None, str(exc)) from None


def make_signer(
    domain: str,
    selectors: Sequence[str],
    paths: Sequence[str],
    sign_headers: str | None,
    oversign: str | None,
) -> Signer:
    try:
        return Signer(
            signing_keys(domain, selectors, paths),
            parse_field_list(sign_headers, DEFAULT_HEADERS),
            parse_field_list(oversign, DEFAULT_OVERSIGN),
        )
    except ValueError as exc:
        raise ConfigError(None, str(exc), usage=True) from None
