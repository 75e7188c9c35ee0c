"""DKIM verification (RFC 6376), one result per signature: the only verifier poste has.

The verifier service labels mail with it and `poste dkim verify` prints it, so
the two cannot disagree about a mail.  dkimpy does the work, its key lookups
going through our resolver (so `--nameserver` can point at a test zone on
loopback).

`verify` is synchronous on purpose: hashing a large body is CPU work, and the
caller decides where it runs (the verifier in its worker pool, the CLI right
away).  dkimpy's asyncio variant fetches keys asynchronously but hashes on the
loop, so it is not used.  dkimpy folds every DNS failure into "did not
verify"; our `dnsfunc` raises its own exception instead, so that a DNS outage
(SERVFAIL, timeout) is `temperror`, something to try again, and not `fail` or
"no key".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import dkim
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from dkim.util import InvalidTagValueList, parse_tag_value

from poste.dns.resolver import SyncResolver

MAX_SIGNATURES = 8  # more is an attack on our CPU, not a sender's need
_SIGNATURE_FIELD = re.compile(rb"(?im)^dkim-signature[ \t]*:")


def has_signature(header: bytes) -> bool:
    """Whether a header section has a DKIM-Signature field: when not, the body is never read."""
    return _SIGNATURE_FIELD.search(header) is not None


class DNSTrouble(Exception):
    """The key could not be fetched for a reason that may go away: temperror."""


@dataclass(frozen=True)
class DKIMResult:
    result: str  # pass, fail, permerror, temperror
    domain: str = ""  # d=
    selector: str = ""  # s=
    signature: str = ""  # b= (unfolded), for header.b
    reason: str = ""
    algorithm: str = ""  # a=, for people reading `poste dkim verify -v`

    @property
    def b_prefix(self) -> str:
        """header.b: enough of b= to tell signatures apart (RFC 6008)."""
        return self.signature[:12]


class QuietLog(logging.Handler):
    """Collects what dkimpy logs: its only way of saying why a check failed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.logger = logging.Logger("poste.dkim.verify")  # detached: no console output
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


def key_lookup(resolver: SyncResolver, seen: dict[str, bytes]) -> Callable[..., bytes | None]:
    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(  # type: ignore[no-untyped-call]
                qname,
                dns.rdatatype.TXT,
                raise_on_no_answer=False,
                search=False,
                lifetime=min(float(timeout), resolver.lifetime),
            )
        except (dns.resolver.NXDOMAIN, dns.name.EmptyLabel, dns.name.LabelTooLong):
            return None
        except (dns.name.NameTooLong, UnicodeError):
            return None
        except (dns.exception.DNSException, OSError) as exc:
            raise DNSTrouble(f"key lookup for {qname} failed ({exc.__class__.__name__})") from None
        if answer.rrset is None:
            return None
        records = [b"".join(rdata.strings) for rdata in answer.rrset]
        if not records:
            return None
        # one TXT per selector is the rule (RFC 6376 3.6.2.2); when a zone
        # has another one beside the key, the key is what was meant
        keys = [r for r in records if b"p=" in r] or records
        seen["key"] = keys[0]
        return keys[0]

    return lookup


def _tags(value: bytes) -> dict[bytes, bytes]:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value)
    except InvalidTagValueList:
        return {}
    return tags


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


def signature_count(message: bytes) -> int:
    """How many DKIM-Signature fields `message` has; those past MAX_SIGNATURES go unchecked."""
    try:
        headers, _body = dkim.rfc822_parse(message)
    except Exception:  # dkimpy's parser has more ways to fail than it declares
        return 0
    return sum(1 for k, _ in headers if k.lower() == b"dkim-signature")


def verify(message: bytes, resolver: SyncResolver) -> list[DKIMResult]:
    """One result per DKIM-Signature field, top first, at most MAX_SIGNATURES; [] for none.

    Blocking (DNS and hashing): run it where CPU work may wait.  A message
    dkimpy cannot split into header fields and body is a single `permerror`
    (the verifier still passes it on; this is a label).
    """
    quiet = QuietLog()
    try:
        d = dkim.DKIM(message, logger=quiet.logger)
    except dkim.DKIMException as exc:
        return [DKIMResult("permerror", reason=f"message not parseable: {exc}")]
    except Exception as exc:  # dkimpy's parser has more ways to fail than it declares
        return [DKIMResult("permerror", reason=f"message not parseable: {exc.__class__.__name__}")]
    sigs = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    results = []
    for idx, value in enumerate(sigs[:MAX_SIGNATURES]):
        tags = _tags(value)
        results.append(
            _one(
                d,
                idx,
                resolver,
                quiet,
                DKIMResult(
                    "",
                    domain=_text(tags.get(b"d", b"")).lower(),
                    selector=_text(tags.get(b"s", b"")),
                    signature=_text(b"".join(tags.get(b"b", b"").split())),
                    algorithm=_text(tags.get(b"a", b"")),
                ),
            )
        )
    return results


def _one(
    d: dkim.DKIM, idx: int, resolver: SyncResolver, quiet: QuietLog, sig: DKIMResult
) -> DKIMResult:
    seen: dict[str, bytes] = {}
    quiet.messages.clear()
    d.pk = None  # set by dkimpy only once a usable key was loaded for this signature

    def result(word: str, reason: str = "") -> DKIMResult:
        return DKIMResult(word, sig.domain, sig.selector, sig.signature, reason, sig.algorithm)

    try:
        ok = d.verify(idx=idx, dnsfunc=key_lookup(resolver, seen))
    except DNSTrouble as exc:
        return result("temperror", str(exc))
    except dkim.ValidationError as exc:
        text = str(exc)
        if "body hash mismatch" in text:
            return result("fail", "body hash did not verify")
        return result("permerror", text)
    except dkim.DKIMException as exc:
        return result("permerror", str(exc))
    except Exception as exc:  # malformed input reaching dkimpy internals
        return result("permerror", f"{exc.__class__.__name__}: {exc}")
    if ok:
        return result("pass")
    if not seen:
        return result("permerror", "no key for signature")
    why = quiet.messages[-1] if quiet.messages else "signature did not verify"
    if getattr(d, "pk", None) is None:  # dkimpy refused the key record: not a failed signature
        if _tags(seen["key"]).get(b"p", b"x").strip() == b"":
            return result("permerror", "key revoked (empty p=)")
        return result("permerror", f"unusable key: {why}")
    return result("fail", why)
