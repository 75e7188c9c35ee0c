"""The forwarding plan: forward a mail as it is, or rewrite its From so DMARC still passes.

A forwarded mail keeps its From and gets SRS on the envelope: SPF then
passes for our domain, which is not the author's, so at the destination
DMARC rests on the author's DKIM signature alone.  When that signature did
not survive the way to us (none, or failing, as our verifier's
Authentication-Results say) and the author's domain publishes `p=reject` or
`p=quarantine`, the destination refuses or hides the mail (Gmail's 550
5.7.26).  Then, and only then, the relay writes the mail as a mailing list
does: From becomes an address of ours that still shows who wrote it,

    From: "Alice via our.test" <fwd+HHHHHHHH=TT=example.org=alice@our.test>

the author goes to Reply-To (unless the mail has one) and X-Original-From,
and the mail is DKIM-signed with our key, so DMARC passes for our domain.
Replies to the From reach the author (the address is a token, fwd_token.py).
Nothing else changes: the body and every other field stay as they came.
Every forwarded mail also gets `X-Forwarded-To:` and `X-Forwarded-For:`
on top (what Gmail asks of forwarders), when it goes to one target: with
several, each target would learn of the others.

The decision is one log line per mail (plan, reason, author domain,
policy) and `poste_forward_plans_total{plan,reason}`.
"""

from __future__ import annotations

import asyncio
import email
import email.header
import email.policy
import email.utils
import logging
from collections.abc import Callable
from dataclasses import dataclass

import authres

from poste.dkim.arc import authserv_id as ar_authserv_id
from poste.dkim.sign import Signer, sign_or_pass
from poste.dns.dmarc import DNSTrouble, Policy, aligned, find_policy
from poste.dns.resolver import NotCached, SyncResolver
from poste.metrics import FORWARD_PLANS
from poste.services.relay.fwd_token import FwdTokens
from poste.services.relay.srs import SRSError
from poste.smtp.address import domain_key, domain_of
from poste.smtp.from_field import from_fields
from poste.smtp.message import Message
from poste.smtp.stage import Envelope

log = logging.getLogger("poste.relay")

MAX_NAME = 200  # characters of the author's display name kept in the new From


@dataclass(frozen=True)
class Plan:
    """What the relay does with one forwarded mail, and why (`reason` is a short code)."""

    plan: str  # "unchanged" or "rewrite"
    reason: str
    author_domain: str = ""
    policy: str = ""  # the policy that applies: none, quarantine, reject ("" unknown)
    detail: str = ""


@dataclass(frozen=True)
class Author:
    name: str  # the display name, decoded ("" when none)
    address: str
    field: bytes  # the From field's value as it came, without the CRLF

    @property
    def domain(self) -> str:
        return domain_key(domain_of(self.address))


def author_of(header: bytes) -> Author | None:
    """The one address of the one From field, or None (none, several, unparseable)."""
    try:
        fields = from_fields(header)  # as email's parser would, by a regex mostly
        if len(fields) != 1:
            return None
        pairs = [p for p in email.utils.getaddresses([fields[0]]) if p[1]]
    except Exception:  # the transport path never trusts the parser
        return None
    if len(pairs) != 1 or "@" not in pairs[0][1] or not domain_of(pairs[0][1]):
        return None
    name, address = pairs[0]
    if "=?" in name:  # an encoded word (RFC 2047); else decoding gives the name back
        try:
            name = str(email.header.make_header(email.header.decode_header(name)))
        except Exception:
            pass
    return Author(" ".join(name.split())[:MAX_NAME], address, _raw_value(header, b"from"))


def _raw_value(header: bytes, name: bytes) -> bytes:
    """The value of the first field `name` as bytes, its folding kept."""
    lines = header.split(b"\r\n")
    for i, line in enumerate(lines):
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == name and line[:1] not in (b" ", b"\t"):
            out = [value.lstrip(b" \t")]
            for more in lines[i + 1:]:
                if more[:1] not in (b" ", b"\t"):
                    break
                out.append(more)
            return b"\r\n".join(out)
    return b""


def dkim_results(header: bytes, server: str) -> list[tuple[str, str]] | None:
    """(result, header.d) of each DKIM signature in the topmost Authentication-Results
    of `server` (our verifier); None when there is no such field or it is unreadable."""
    msg = email.message_from_bytes(header, policy=email.policy.compat32)
    for value in msg.get_all("Authentication-Results") or []:
        raw = str(value).encode("utf-8", "replace")
        if ar_authserv_id(raw) != server:
            continue
        try:
            parsed = authres.AuthenticationResultsHeader.parse_value(
                " ".join(str(value).split()))
        except Exception:
            return None
        out = []
        for r in parsed.results:
            if str(r.method).lower() != "dkim":
                continue
            d = next((str(p.value) for p in r.properties
                      if str(p.type).lower() == "header" and str(p.name).lower() == "d"), "")
            out.append((str(r.result).lower(), d))
        return out
    return None


def decide(
    header: bytes,
    *,
    server: str,
    is_local: Callable[[str], bool],
    policy_of: Callable[[str], Policy | None],
    enabled: bool = True,
) -> Plan:
    """The plan for a forwarded mail's header (blocking: the policy is a DNS lookup)."""
    if not enabled:
        return Plan("unchanged", "off")
    author = author_of(header)
    if author is None:
        return Plan("unchanged", "no-single-from")
    dom = author.domain
    if is_local(dom):
        return Plan("unchanged", "own-domain", dom)
    # The policy first (a cached DNS answer, mostly): only a domain that would refuse
    # the mail needs our verifier's results read, and parsing that field (authres)
    # was a fifth of `poste up`'s CPU per mail at 5 KB (issue 16).
    try:
        policy = policy_of(dom)
    except DNSTrouble as exc:
        return Plan("unchanged", "dns-error", dom, detail=str(exc))
    if policy is None:
        return Plan("unchanged", "no-policy", dom, "none")
    applied = policy.sp if policy.org_record and policy.sp else policy.p
    if applied not in ("reject", "quarantine"):
        return Plan("unchanged", "policy-none", dom, applied)
    results = dkim_results(header, server)
    if results is None:
        return Plan("unchanged", "no-results", dom, applied,
                    detail=f"no Authentication-Results of {server}")
    passing = [d for result, d in results if result == "pass" and aligned(d, dom, policy.adkim)]
    if passing:
        return Plan("unchanged", "aligned-dkim", dom, applied, f"d={passing[0]}")
    seen = ", ".join(f"{r} d={d}" for r, d in results) or "no signature"
    return Plan("rewrite", "no-aligned-dkim", dom, applied, seen)


@dataclass(frozen=True)
class Forwarded:
    """What the stage does: `prepend` on top of `message` (None: the mail as it came)."""

    prepend: bytes = b""
    message: Message | None = None
    note: str = ""  # the plan, for the core's one log line of this mail (smtp/chain.py)


class Forwarding:
    """The relay stage's call for each mail: the plan, applied."""

    def __init__(
        self,
        *,
        domain: str,
        server: str,
        tokens: FwdTokens,
        resolver: SyncResolver,
        signer: Signer | None,
        is_local: Callable[[str], bool],
        targets: Callable[[str], list[str]],
        enabled: bool = True,
    ) -> None:
        self.domain = domain
        self.server = server.strip().lower()
        self.tokens = tokens
        self.resolver = resolver
        self.signer = signer
        self.is_local = is_local
        self.targets = targets
        self.enabled = enabled

    async def apply(self, env: Envelope, message: Message) -> Forwarded:
        forwarded = [r for r in env.rcpt_tos if "@" in r and self.is_local(domain_of(r))]
        if not forwarded:
            return Forwarded()  # not forwarded: our users' own mail out
        header = message.header()
        try:
            try:  # on the loop when the author domain's DMARC answer is cached (most mail)
                plan = decide(
                    header, server=self.server, is_local=self.is_local, enabled=self.enabled,
                    policy_of=lambda d: find_policy(self.resolver, d, cached_only=True),
                )
            except NotCached:  # else in a thread, which may wait on the DNS
                plan = await asyncio.to_thread(
                    decide, header, server=self.server, is_local=self.is_local,
                    policy_of=lambda d: find_policy(self.resolver, d), enabled=self.enabled,
                )
        except Exception:  # a surprise of ours must not cost the mail: it goes on as it came
            log.exception("%s forward plan failed", env.queue_id)
            plan = Plan("unchanged", "error")
        top = self._forward_fields(forwarded)
        rewritten = None
        if plan.plan == "rewrite":
            try:
                rewritten = await self._rewrite(env, message, header)
            except Exception:
                log.exception("%s From rewrite failed", env.queue_id)
            if rewritten is None:
                plan = Plan("unchanged", "not-rewritable", plan.author_domain, plan.policy)
        note = (f"forward plan={plan.plan} reason={plan.reason} "
                f"author-domain={plan.author_domain or '-'} policy={plan.policy or '-'}"
                + (f" ({plan.detail})" if plan.detail else ""))
        FORWARD_PLANS.labels(plan.plan, plan.reason).inc()
        return Forwarded(top, rewritten, note)

    def _forward_fields(self, forwarded: list[str]) -> bytes:
        pairs = [(r, t) for r in forwarded for t in self.targets(r)]
        if len(pairs) != 1:
            return b""
        original, target = pairs[0]
        return (f"X-Forwarded-To: {target}\r\n"
                f"X-Forwarded-For: {original} {target}\r\n").encode("utf-8", "surrogateescape")

    async def _rewrite(self, env: Envelope, message: Message, header: bytes) -> Message | None:
        author = author_of(header)
        assert author is not None  # decide() found it
        try:
            if not author.address.isascii():  # a UTF-8 From would need SMTPUTF8 all the way
                raise SRSError(f"<{author.address}> is not ASCII")
            address = self.tokens.address(author.address)
        except SRSError as exc:
            log.info("%s From not rewritten: %s", env.queue_id, exc)
            return None
        shown = f"{author.name or author.address} via {self.domain}"
        new_from = email.utils.formataddr((shown, address), charset="utf-8")
        extra = b"X-Original-From: " + author.field + b"\r\n"
        if not _raw_value(header, b"reply-to"):
            extra = b"Reply-To: " + author.field + b"\r\n" + extra
        try:
            out = message.replace_field(b"From", f"From: {new_from}\r\n".encode()).prepend(extra)
        except KeyError:
            return None
        if self.signer is not None:
            async with out.whole() as data:
                sig = await asyncio.to_thread(sign_or_pass, self.signer, data, env.queue_id)
            out = out.prepend(sig)
        return out
