"""DKIM verification per mail: dkimpy's own RSA against poste's (`dkim/fast_rsa.py`).

Run by hand: `.venv/bin/python bench/dkim_verify.py [ROUNDS]`.  One process, one
thread; a 5 KB and a 100 KB mail, each signed rsa-sha256 with a 2048-bit key, the
key served from memory (no DNS).  Each round times `dkim.verify` N times with
dkimpy's own `parse_public_key`/`RSASSA_PKCS1_v1_5_verify`, then N times with
poste's (installed by importing `poste.dkim`, swapped back for the dkimpy rows);
rounds interleave and the best round counts.  Prints ms per verify and the ratio.
"""

from __future__ import annotations

import base64
import sys
import time
from collections.abc import Callable

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from poste.dkim import fast_rsa

N = 200


def mail(size: int) -> tuple[bytes, Callable[..., bytes]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    line = b"A line of text in the body of a mail, seventy-odd bytes long, more or less.\r\n"
    body = line * (size // len(line))
    head = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: bench\r\n\r\n"
    sig = dkim.sign(head + body, b"s", b"example.org", pem,
                    include_headers=[b"from", b"to", b"subject"])
    return sig + head + body, lambda name, timeout=5: txt


def timed(message: bytes, dns: Callable[..., bytes], fast: bool) -> float:
    dkim.parse_public_key = fast_rsa.parse_public_key if fast else fast_rsa._dkimpy_parse
    dkim.RSASSA_PKCS1_v1_5_verify = (fast_rsa.rsassa_pkcs1_v1_5_verify if fast
                                     else fast_rsa._dkimpy_verify)
    assert dkim.verify(message, dnsfunc=dns)
    start = time.perf_counter()
    for _ in range(N):
        dkim.verify(message, dnsfunc=dns)
    return (time.perf_counter() - start) / N * 1000


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for size in (5_000, 100_000):
        message, dns = mail(size)
        best = {False: float("inf"), True: float("inf")}
        for _ in range(rounds):
            for fast in (False, True):
                best[fast] = min(best[fast], timed(message, dns, fast))
        print(f"{size // 1000:>4} KB: dkimpy {best[False]:.3f} ms, poste {best[True]:.3f} ms"
              f" per verify, ratio {best[True] / best[False]:.2f}")


if __name__ == "__main__":
    main()
