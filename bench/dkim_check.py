"""dkim_check.py -- does a mail the bench's sink got carry a DKIM signature that verifies?

bench/outbound.sh's check before every measured run: one mail sent through the signing
path, dumped by smtp-sink, must come out signed by the expected domain, and the signature
must verify with dkimpy against the key in the bench's own nsd (poste's verifier is not
used, so poste does not judge its own signature). smtp-sink's dump starts with its own
`X-Client-*`/`X-*-Args:` lines (unsigned fields, harmless to DKIM); they are dropped.

    .venv/bin/python bench/dkim_check.py --nameserver 127.0.0.1:5455 --domain out.example.net DUMP

Prints `dkim ok: d=DOMAIN s=SELECTOR a=ALG` and exits 0; else one line and exit 1.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype

SINK_FIELDS = re.compile(rb"^X-(Client-Addr|Client-Proto|Helo-Args|Mail-Args|Rcpt-Args): ")


def dns_txt(server: str, port: int) -> Callable[..., bytes]:
    """dkimpy's dnsfunc: the TXT record of `name`, asked of the bench's nsd only."""

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        q = dns.message.make_query(name.decode().rstrip("."), dns.rdatatype.TXT)
        r = dns.query.tcp(q, server, timeout=timeout, port=port)
        for rrset in r.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                return b"".join(rrset[0].strings)
        return b""

    return lookup


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dump", type=Path)
    p.add_argument("--nameserver", required=True, metavar="IP:PORT")
    p.add_argument("--domain", required=True, help="The d= the signature must have.")
    a = p.parse_args(argv)
    host, _, port = a.nameserver.rpartition(":")
    try:
        raw = a.dump.read_bytes()
    except OSError as e:
        print(f"dkim_check: {e}", file=sys.stderr)
        return 1
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    while lines and SINK_FIELDS.match(lines[0]):
        lines.pop(0)
    msg = b"\r\n".join(lines)
    d = dkim.DKIM(msg)
    sig = re.search(rb"^DKIM-Signature:(.*?)\r\n(?! |\t)", msg, re.S | re.M)
    if not sig:
        print("dkim_check: no DKIM-Signature in the mail", file=sys.stderr)
        return 1
    tags = dict(re.findall(rb"\b([a-z])=\s*([^;\s]+)", sig.group(1)))
    if tags.get(b"d", b"").decode() != a.domain:
        print(f"dkim_check: signed by d={tags.get(b'd', b'?').decode()}, not {a.domain}",
              file=sys.stderr)
        return 1
    if not d.verify(dnsfunc=dns_txt(host, int(port))):
        print("dkim_check: the DKIM-Signature does not verify", file=sys.stderr)
        return 1
    print(f"dkim ok: d={a.domain} s={tags.get(b's', b'?').decode()}"
          f" a={tags.get(b'a', b'?').decode()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
