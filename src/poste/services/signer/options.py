"""The signer's key and field flags, shared by `poste signer`, `poste dkim sign` and `poste up`."""

from __future__ import annotations

from collections.abc import Sequence

import click

from poste.dkim import keys as dkim_keys
from poste.dkim.sign import DEFAULT_HEADERS, DEFAULT_OVERSIGN, Signer, SigningKey


def parse_field_list(text: str | None, default: Sequence[str]) -> tuple[str, ...]:
    """`From,To,Subject` -> the field names (the default when not given)."""
    if text is None:
        return tuple(default)
    return tuple(f.strip() for f in text.split(",") if f.strip())


def signing_keys(domain: str, selectors: Sequence[str], paths: Sequence[str]) -> list[SigningKey]:
    """Pair `--selector`/`--private-key` flags in order: one signature per key."""
    if not paths:
        raise click.UsageError("give at least one --private-key")
    if len(selectors) != len(paths):
        raise click.UsageError(
            f"{len(selectors)} --selector for {len(paths)} --private-key: give one selector per key"
        )
    out = []
    for selector, path in zip(selectors, paths, strict=True):
        try:
            key = dkim_keys.load_key(path)
        except dkim_keys.DKIMKeyError as exc:
            raise click.ClickException(str(exc)) from None
        out.append(SigningKey(domain.rstrip("."), selector, key))
    return out


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
        raise click.UsageError(str(exc)) from None


sign_header_options = [
    click.option(
        "--sign-headers",
        metavar="F1,F2,...",
        help="Header fields to sign (default: " + ",".join(DEFAULT_HEADERS) + ").",
    ),
    click.option(
        "--oversign",
        metavar="F1,...",
        help="Fields signed once more than present, so none can be added (default: From).",
    ),
]
