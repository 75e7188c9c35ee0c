"""The `Authentication-Results:` field (RFC 8601) with spf, dkim, arc and dmarc.

One field, naming our host as authserv-id, one resinfo per method (one per
SPF identity checked, one per DKIM signature), each on its own folded line so the field stays readable and
under the line-length limits whatever the sender put in its envelope.
"""

from __future__ import annotations

import re

from poste.dkim.arc import ARCResult
from poste.dkim.verify import DKIMResult
from poste.services.verifier.dmarc import DMARCResult
from poste.services.verifier.spf import SPFResult

_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+$")
_ADDRESS = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]+@[A-Za-z0-9.\-]+$")


def _value(text: str) -> str:
    """A property or authserv-id value: token as is, otherwise a quoted-string."""
    if _TOKEN.match(text):
        return text
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return "(" + clean.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def spf_resinfo(spf: SPFResult) -> str:
    if spf.identity == "mailfrom":
        # pvalue = [[local-part] "@"] domain-name: a plain address goes unquoted
        who = spf.sender if _ADDRESS.match(spf.sender) else _value(spf.domain)
        prop = f"smtp.mailfrom={who}"
    else:
        prop = f"smtp.helo={_value(spf.helo)}"
    return f"spf={spf.result} {prop}"


def dkim_resinfo(result: DKIMResult) -> str:
    parts = [f"dkim={result.result}"]
    if result.reason and result.result != "pass":
        parts.append(_comment(result.reason[:120]))
    if result.domain:
        parts.append(f"header.d={_value(result.domain)}")
    if result.selector:
        parts.append(f"header.s={_value(result.selector)}")
    if result.signature:
        parts.append(f"header.b={_value(result.b_prefix)}")
    return " ".join(parts)


def arc_resinfo(result: ARCResult, remote_ip: str = "") -> str:
    """`arc=` (RFC 8617 4.4, 5.2): the relay copies it into the next seal's cv=.

    header.oldest-pass (0: every ARC-Message-Signature validated) only for a
    chain that passes; smtp.remote-ip, as RFC 8617's examples, when known.
    """
    parts = [f"arc={result.result}"]
    if result.reason and result.result != "pass":
        parts.append(_comment(result.reason[:120]))
    if result.result == "pass" and result.oldest_pass is not None:
        parts.append(f"header.oldest-pass={result.oldest_pass}")
    if remote_ip and result.result != "none":
        parts.append(f"smtp.remote-ip={_value(remote_ip)}")
    return " ".join(parts)


def dmarc_resinfo(result: DMARCResult, disposition: str = "none") -> str:
    parts = [f"dmarc={result.result}"]
    if result.policy is not None:
        parts.append(_comment(f"p={result.policy.p} dis={disposition}"))
    elif result.reason:
        parts.append(_comment(result.reason[:120]))
    if result.from_domain:
        parts.append(f"header.from={_value(result.from_domain)}")
    return " ".join(parts)


def authentication_results(
    authserv_id: str,
    spf: SPFResult | None,
    dkim: list[DKIMResult],
    dmarc: DMARCResult | None,
    *,
    disposition: str = "none",
    helo_spf: SPFResult | None = None,
    arc: ARCResult | None = None,
    remote_ip: str = "",
) -> str:
    """The whole field, folded, without the final CRLF.

    `spf` is the MAIL FROM identity's result (smtp.mailfrom, or smtp.helo
    for the null sender); `helo_spf`, when HELO was checked on its own,
    adds a second spf resinfo with smtp.helo (RFC 8601 2.7.2 allows one per
    identity).
    """
    resinfos = []
    if spf is not None:
        resinfos.append(spf_resinfo(spf))
    if helo_spf is not None:
        resinfos.append(spf_resinfo(helo_spf))
    if dkim:
        resinfos += [dkim_resinfo(r) for r in dkim]
    else:
        resinfos.append("dkim=none")
    if arc is not None:
        resinfos.append(arc_resinfo(arc, remote_ip))
    if dmarc is not None:
        resinfos.append(dmarc_resinfo(dmarc, disposition))
    return f"Authentication-Results: {_value(authserv_id)};\r\n\t" + ";\r\n\t".join(resinfos)
