"""ARC (RFC 8617): seal a mail we forward, validate the chain of a mail we receive.

dkimpy does the work (`dkim.ARC`): canonicalisation, the three fields of a
set, the chain rules.  Its RSA operations go through the same hook as our
DKIM signatures and verification (`poste.dkim.fast_rsa`): seals are made
and checked by OpenSSL; RFC 8617 allows rsa-sha256 only, so a seal needs an RSA key.

Sealing copies into ARC-Authentication-Results the results of one
Authentication-Results field: ours (`authserv_id`), and only the topmost
one, the one our verifier prepended.  dkimpy would merge every field that
carries the id, and a sender can write any field it likes below ours, so
the others are dropped from dkimpy's view before it seals (Authentication-
Results is never signed by the seal, so dropping them changes no hash).
The chain validation status `cv=` is the `arc=` result in that field: the
verifier's verdict on the chain as it arrived.

A mail that cannot be sealed (no results of ours, a header Python's parser
rejects, an ed25519-only key...) goes on unsealed; `Unsealable` says why.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import dkim

from poste.dkim import verify as dkim_verify
from poste.dkim.sign import DEFAULT_HEADERS, SigningKey, Unsignable, check_parsable
from poste.dns.resolver import SyncResolver

log = logging.getLogger("poste.dkim")

_AR = b"authentication-results"
_ARC_SEAL = re.compile(rb"^arc-seal[ \t]*:", re.IGNORECASE | re.MULTILINE)


class Unsealable(Exception):
    """The message cannot be sealed; it should go on as it is."""


@dataclass(frozen=True)
class ARCResult:
    """The chain of a received mail: `result` is pass, fail or none (RFC 8617 4.4)."""

    result: str
    instance: int = 0  # the newest set's i= (0: no chain)
    oldest_pass: int | None = None  # RFC 8617 5.2 step 6, for a chain that passes
    domain: str = ""  # d= of the newest ARC-Seal
    reason: str = ""


def authserv_id(value: bytes) -> str:
    """The authserv-id of an Authentication-Results value (before the first `;`)."""
    text = value.split(b";", 1)[0].decode("ascii", "replace")
    text = re.sub(r"\([^)]*\)", " ", text)  # CFWS comments
    words = text.split()
    return words[0].lower() if words else ""


def _keep_topmost_results(headers: list[tuple[bytes, bytes]], srv_id: str) -> int:
    """Drop every Authentication-Results of `srv_id` but the topmost; how many are left."""
    out: list[tuple[bytes, bytes]] = []
    found = 0
    for name, value in headers:
        if name.lower() == _AR and authserv_id(value) == srv_id:
            if found:
                continue
            found = 1
            name = b"Authentication-Results"  # dkimpy looks for this spelling only
        out.append((name, value))
    headers[:] = out
    return found


class Sealer:
    """Makes the three fields of the next ARC set (AS, AMS, AAR) for a forwarded mail."""

    def __init__(
        self, key: SigningKey, authserv_id: str, headers: Sequence[str] = DEFAULT_HEADERS
    ) -> None:
        if key.key.algorithm != "rsa":
            raise ValueError(f"ARC seals with rsa-sha256 only (RFC 8617): {key.selector} is "
                             f"{key.key.algorithm}")
        if not authserv_id.strip():
            raise ValueError("ARC sealing needs the authserv-id of our verifier")
        self.key = key
        self.authserv_id = authserv_id.strip().lower()
        self.headers = tuple(headers)
        self._pk = key.dkimpy_key()

    def seal(self, message: bytes, linesep: bytes = b"\r\n", timestamp: int | None = None) -> bytes:
        """The ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results) to
        prepend, each ending in `linesep`; raises Unsealable."""
        try:
            a = dkim.ARC(message, logger=log, linesep=linesep)
        except dkim.DKIMException as exc:
            raise Unsealable(str(exc)) from None
        except IndexError:  # dkimpy: the first line is a continuation
            raise Unsealable("the header block starts with a continuation line") from None
        try:
            check_parsable(a.headers, self.headers)
        except Unsignable as exc:
            raise Unsealable(str(exc)) from None
        if not _keep_topmost_results(a.headers, self.authserv_id):
            raise Unsealable(f"no Authentication-Results of {self.authserv_id}")
        a.should_sign = {h.lower().encode() for h in self.headers}
        include = a.default_sign_headers()
        if not any(h.lower() == b"from" for h in include):
            raise Unsealable("no From field")
        try:
            fields = a.sign(
                self.key.selector.encode(), self.key.domain.encode(), self._pk,
                self.authserv_id.encode(), include_headers=include, timestamp=timestamp,
            )
        except dkim.DKIMException as exc:
            raise Unsealable(str(exc)) from None
        except Exception as exc:  # authres' parser: a field of ours it cannot read
            raise Unsealable(f"{exc.__class__.__name__}: {exc}") from None
        if not fields:
            raise Unsealable("the chain ended (dkimpy made no set)")
        return b"".join(fields)


def seal_or_pass(sealer: Sealer, message: bytes, queue_id: str = "-") -> bytes:
    """What to prepend: the ARC set, or nothing (with a log line) when the mail cannot be sealed."""
    try:
        return sealer.seal(message)
    except Unsealable as exc:
        log.info("%s: not ARC-sealed, passed on as is: %s", queue_id, exc)
    except Exception:  # a dkimpy surprise must not cost the mail either
        log.exception("%s: not ARC-sealed (sealing failed), passed on as is", queue_id)
    return b""


def has_arc(message: bytes) -> bool:
    """Whether the header section (of a mail or alone) has an ARC-Seal: else no chain."""
    end = message.find(b"\r\n\r\n")
    return bool(_ARC_SEAL.search(message if end < 0 else message[:end]))


def verify(message: bytes, resolver: SyncResolver) -> ARCResult:
    """Validate the ARC chain of `message` (blocking: DNS and hashing).

    RFC 8617 knows only none, pass and fail; a key that cannot be fetched
    (DNS trouble) makes the chain `fail` with the reason, since a `cv=`
    must be one of the three and a later seal carries our verdict on.
    """
    quiet = dkim_verify.QuietLog()
    try:
        a = dkim.ARC(message, logger=quiet.logger)
    except Exception as exc:  # dkimpy's parser has more ways to fail than it declares
        if not has_arc(message):
            return ARCResult("none")
        return ARCResult("fail", reason=f"message not parseable ({exc.__class__.__name__})")
    try:
        cv, sets, why = a.verify(dnsfunc=dkim_verify.key_lookup(resolver, {}))
    except dkim_verify.DNSTrouble as exc:
        return ARCResult("fail", reason=str(exc))
    except Exception as exc:  # malformed input reaching dkimpy internals
        return ARCResult("fail", reason=f"{exc.__class__.__name__}: {exc}")
    newest = sets[0] if sets else {}
    instance = int(newest.get("instance", 0))
    domain = newest.get("as-domain", b"").decode("ascii", "replace").lower()
    if cv == dkim.CV_None:
        return ARCResult("none")
    if cv != dkim.CV_Pass:  # CV_Fail, or None: a seal said cv=fail, the chain ended there
        return ARCResult("fail", instance, None, domain, why)
    oldest = 0
    for s in sets[1:]:
        if not s.get("ams-valid"):
            oldest = int(s["instance"]) + 1
            break
    return ARCResult("pass", instance, oldest, domain)
