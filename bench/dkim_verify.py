"""dkim_verify.py -- CPU of one DKIM verification, OpenSSL's RSA (poste) against dkimpy's own.

A mail of each size is signed (rsa-sha256, relaxed/relaxed, by poste's Signer) and
verified N times by dkimpy's `DKIM.verify`, as poste's verifier calls it, with the key
record from a dict (no DNS): once with `poste.dkim.fast_rsa`'s hook and once with
dkimpy's pure-Python functions put back, alternating, in the same process.  Per mail
times and their ratio are printed; on a shared machine only the ratio means much.

    .venv/bin/python bench/dkim_verify.py [-n 200] [--bits 2048] [--sizes 5000,1000000]
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from collections.abc import Callable

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from poste.dkim import fast_rsa
from poste.dkim.keys import DKIMKey
from poste.dkim.sign import Signer, SigningKey


def _mail(size: int) -> bytes:
    head = (b"From: Alice <alice@bench.test>\r\nTo: bob@example.net\r\nSubject: bench\r\n"
            b"Date: Thu, 03 Dec 2026 17:00:00 +0000\r\nMessage-ID: <1@bench.test>\r\n\r\n")
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    return head + line * max(1, size // len(line))


def _run(message: bytes, record: bytes, n: int, own: bool) -> float:
    saved = {name: getattr(dkim, name) for name in fast_rsa.DKIMPY_OWN}
    if own:
        for name, fn in fast_rsa.DKIMPY_OWN.items():
            setattr(dkim, name, fn)
    lookup: Callable[..., bytes] = lambda name, timeout=5: record  # noqa: E731
    try:
        start = time.process_time()
        for _ in range(n):
            if not dkim.DKIM(message).verify(dnsfunc=lookup):
                raise SystemExit("dkim_verify: the bench mail did not verify")
        return (time.process_time() - start) / n
    finally:
        for name, fn in saved.items():
            setattr(dkim, name, fn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=200, help="verifications per size and side")
    p.add_argument("--bits", type=int, default=2048)
    p.add_argument("--sizes", default="5000,1000000", help="mail sizes in bytes, comma-separated")
    a = p.parse_args(argv)
    private = rsa.generate_private_key(public_exponent=65537, key_size=a.bits)
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    signer = Signer([SigningKey("bench.test", "s", DKIMKey("rsa", private))])
    for size in (int(s) for s in a.sizes.split(",")):
        message = _mail(size)
        message = signer.sign(message) + message
        n = max(3, a.n if size <= 100_000 else a.n // 20)
        ours, theirs = [], []
        for _ in range(3):  # alternate, so that load on a shared machine hits both sides
            theirs.append(_run(message, record, n, own=True))
            ours.append(_run(message, record, n, own=False))
        o, t = min(ours), min(theirs)
        print(f"{len(message):>8} B  rsa-{a.bits}  dkimpy {t * 1e3:7.3f} ms  "
              f"poste {o * 1e3:7.3f} ms  ratio {t / o:5.2f}x  (CPU per verify, best of 3 x {n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
