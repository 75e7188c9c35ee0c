"""DKIM signing: dkimpy's canonicalisation and header logic, `cryptography`'s RSA.

dkimpy does RSA in pure Python; a `CryptoRSA` key is signed by OpenSSL
instead (`fast_rsa.py`, which also does the verifier's RSA).  ed25519 goes
through dkimpy's own pynacl path (libsodium), which is already fast.

A mail we cannot sign (a header Python's parser rejects, no From:, a line in
the header block that is not a field) is not an error for the service: the
caller gets `Unsignable` and passes the mail on unsigned.
"""

from __future__ import annotations

import email.policy
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.headerregistry import AddressHeader, MessageIDHeader
from typing import Any

import dkim
from cryptography.hazmat.primitives.asymmetric import rsa

from poste.dkim.fast_rsa import CryptoRSA
from poste.dkim.keys import DKIMKey, load_key

log = logging.getLogger("poste.dkim")

DEFAULT_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Reply-To",
    "In-Reply-To",
    "References",
)
# Signed once more than they occur, so nobody can add another one later.
DEFAULT_OVERSIGN: tuple[str, ...] = ("From",)


class Unsignable(Exception):
    """The message cannot be signed; it should go on as it is."""


@dataclass(frozen=True)
class SigningKey:
    """One signature to make: d= domain, s= selector, and the key."""

    domain: str
    selector: str
    key: DKIMKey

    def dkimpy_key(self) -> Any:
        if isinstance(self.key.private, rsa.RSAPrivateKey):
            return CryptoRSA(self.key.private)
        return self.key.ed25519_seed_b64()


def pair_keys(domain: str, selectors: Sequence[str], paths: Sequence[str]) -> list[SigningKey]:
    """One SigningKey per `--selector`/`--private-key` pair, in order.

    The signer and the relay (which signs its own DSNs and seals with the same
    keys) read their keys through this one function.  Raises ValueError for
    unequal counts and DKIMKeyError (a ValueError) for a key file it cannot use.
    """
    if len(selectors) != len(paths):
        raise ValueError(f"{len(selectors)} selectors for {len(paths)} keys")
    return [
        SigningKey(domain.rstrip("."), selector, load_key(path))
        for selector, path in zip(selectors, paths, strict=True)
    ]


def _strict_classes() -> dict[str, Any]:
    """policy.default's header classes for the fields its parser can reject.

    Only the address fields and Message-ID raise (IndexError, HeaderParseError
    on `From: <`, `To: a@`...); Subject, Date and the MIME fields record a
    defect and go on, so they are not parsed at all.  The classes are built
    once here (the registry builds a new class on every lookup).
    """
    registry: Any = email.policy.default.header_factory
    out = {}
    for name, cls in registry.registry.items():
        if not issubclass(cls, AddressHeader | MessageIDHeader):
            continue
        out[name] = type("_" + cls.__name__, (cls, registry.base_class), {})
    return out


_STRICT = _strict_classes()

# Shapes the strict parser always reads without complaint: `addr@dom`, `Name <addr@dom>`,
# `"Any, Name" <addr@dom>`, lists of them, `<id@host>`.  Nearly every From, To and
# Message-ID a mail client writes is one of them, and a regex match is some 30 times
# cheaper than the parser (issue 16: the strict parse was 6% of `poste up`'s CPU per
# sent mail).  Anything else (comments, groups, encoded words in quotes, obsolete
# forms, 8-bit) still goes through the parser.  tests/test_dkim_sign.py checks that
# every value these accept, the parser accepts too.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_ADDR = rf"{_DOT_ATOM}@{_DOT_ATOM}"
_NAME = rf'(?:{_ATEXT}+(?: {_ATEXT}+)*|"[\x20\x21\x23-\x5b\x5d-\x7e]*")'
_MAILBOX = rf"(?:{_ADDR}|(?:{_NAME} ?)?<{_ADDR}>)"
SIMPLE_ADDRESSES = re.compile(rf"{_MAILBOX}(?: ?, ?{_MAILBOX})*")
SIMPLE_MSG_ID = re.compile(rf"<{_DOT_ATOM}@{_DOT_ATOM}>")
_SIMPLE = {name: SIMPLE_MSG_ID if issubclass(cls, MessageIDHeader) else SIMPLE_ADDRESSES
           for name, cls in _STRICT.items()}


def check_parsable(headers: Sequence[tuple[bytes, bytes]], fields: Sequence[str]) -> None:
    """Raise Unsignable when Python's mail parser rejects a field we would sign.

    The transport path never re-serialises, but a signature over fields that
    a receiver's parser rejects only invites trouble; ptt's signer dropped such
    mail, we pass it on unsigned instead.  Each field the strict parser
    (`policy.default`) can reject goes through it on its own, a fraction of the
    cost of parsing the whole message.
    """
    wanted = {f.lower() for f in fields}
    for raw_name, raw_value in headers:
        name = raw_name.decode("ascii", "surrogateescape")
        if name.lower() not in _STRICT or name.lower() not in wanted:
            continue
        value = raw_value.decode("ascii", "surrogateescape")
        value = "".join(value.splitlines()).strip()
        if not _SIMPLE[name.lower()].fullmatch(value):
            strict_parse(name, value)


def strict_parse(name: str, value: str) -> None:
    """The strict parser's judgement of one field (unfolded value); Unsignable if it rejects."""
    try:
        parsed = _STRICT[name.lower()](name, value)
        str(parsed)
    except Exception as exc:  # the parser's errors are IndexError, HeaderParseError...
        reason = f"rejected by the mail parser ({type(exc).__name__})"
        raise Unsignable(f"{name}: {reason}") from None
    # Python 3.13 no longer raises on an unparsable address (`From: <`): it records this
    # defect and reads it as `<>`, where 3.11 raised IndexError.
    for defect in getattr(parsed, "defects", ()):
        if "invalid address in address-list" in str(defect):
            raise Unsignable(f"{name}: rejected by the mail parser ({defect})")


class Signer:
    """Makes the DKIM-Signature fields for a message, one per key."""

    def __init__(
        self,
        keys: Sequence[SigningKey],
        headers: Sequence[str] = DEFAULT_HEADERS,
        oversign: Sequence[str] = DEFAULT_OVERSIGN,
    ) -> None:
        if not keys:
            raise ValueError("no signing key")
        lowered = [h.lower() for h in headers]
        if "from" not in lowered:
            raise ValueError("the From field must be signed (RFC 6376 5.4)")
        bad = set(lowered) & {h.decode() for h in dkim.DKIM.SHOULD_NOT}
        if bad:
            raise ValueError(f"these fields must not be signed: {', '.join(sorted(bad))}")
        self.keys = list(keys)
        self.headers = tuple(headers)
        self.oversign = tuple(oversign)
        self._prepared = [(k, k.dkimpy_key()) for k in self.keys]

    def sign(self, message: bytes, linesep: bytes = b"\r\n") -> bytes:
        """The DKIM-Signature fields (ending in `linesep`) to prepend; raises Unsignable."""
        try:
            d = dkim.DKIM(message, logger=log, linesep=linesep)
        except dkim.DKIMException as exc:  # a header line that is not a field
            raise Unsignable(str(exc)) from None
        except IndexError:  # dkimpy: the first line is a continuation
            raise Unsignable("the header block starts with a continuation line") from None
        check_parsable(d.headers, self.headers)
        d.should_sign = {h.lower().encode() for h in self.headers}
        d.frozen_sign = {h.lower().encode() for h in self.oversign}
        include = d.default_sign_headers()
        if not any(h.lower() == b"from" for h in include):
            raise Unsignable("no From field")
        out = []
        for key, pk in self._prepared:
            try:
                field = d.sign(
                    key.selector.encode(),
                    key.domain.encode(),
                    pk,
                    signature_algorithm=key.key.signature_algorithm,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=include,
                )
            except dkim.DKIMException as exc:
                raise Unsignable(str(exc)) from None
            out.append(field)
        return b"".join(out)


def sign_or_pass(signer: Signer, message: bytes, queue_id: str = "-") -> bytes:
    """What to prepend: the signatures, or nothing (with a log line) when unsignable."""
    try:
        return signer.sign(message)
    except Unsignable as exc:
        log.warning("%s: not signed, passed on as is: %s", queue_id, exc)
    except Exception:  # a dkimpy surprise must not cost the mail either
        log.exception("%s: not signed (signing failed), passed on as is", queue_id)
    return b""
