"""DKIM signing rate per algorithm, and what routing RSA through `cryptography` buys.

Run by hand: `.venv/bin/python bench/dkim_sign.py [SECONDS_PER_CASE]`.  Every case
signs the same ~3 KB mail in this one process, single-threaded, with
relaxed/relaxed and the default header list:

- poste rsa-sha256 (2048, 3072 bits): `poste.dkim.sign.Signer` (dkimpy for
  canonicalisation and headers, OpenSSL for the RSA operation);
- poste ed25519-sha256: the same Signer (dkimpy + pynacl);
- poste dual: rsa-sha256 2048 and ed25519-sha256 on each mail (what `poste signer`
  does with two keys);
- dkimpy rsa-sha256 2048: dkimpy's own pure-Python RSA (`dkim.sign` with the PEM),
  the cost poste avoids.

Two ARC rows (RFC 8617, rsa-sha256 2048): a seal as the relay makes it
(`poste.dkim.arc.Sealer`: dkimpy's ARC with OpenSSL RSA, two signatures per
set) against dkimpy's own `arc_sign` (pure-Python RSA), on the same mail with
a verifier's Authentication-Results on top.

Two more rows split the cost of one poste RSA signature: the OpenSSL operation
alone, and the strict header parse check alone (the rest is dkimpy's
canonicalisation and hashing).  Cases run interleaved in rounds and the best round counts.  Prints signatures per second, the mean time per mail, and the ratio to dkimpy's
pure-Python RSA.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from poste.dkim import keys
from poste.dkim.arc import Sealer
from poste.dkim.sign import DEFAULT_HEADERS, Signer, SigningKey, check_parsable

DOMAIN = "example.test"
ROUNDS = 5
MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@remote.test>\r\n"
    b"Subject: bench\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <bench@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n" + b"A line of text in the body of the bench mail.\r\n" * 64
)


def rate(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    fn()  # warm up
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        fn()
        n += 1
        if n % 10 == 0 and time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    return n / elapsed, n


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    rsa2048 = keys.generate("rsa", 2048)
    rsa3072 = keys.generate("rsa", 3072)
    ed = keys.generate("ed25519")
    pem = rsa2048.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    include = [h.lower().encode() for h in DEFAULT_HEADERS]

    def dkimpy_rsa() -> bytes:
        d = dkim.DKIM(MESSAGE)
        d.should_sign = set(include)
        return d.sign(
            b"s",
            DOMAIN.encode(),
            pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=d.default_sign_headers(),
        )

    priv = rsa2048.private
    assert isinstance(priv, rsa.RSAPrivateKey)
    digest = hashlib.sha256(MESSAGE).digest()

    def openssl_only() -> bytes:
        return priv.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))

    parsed = dkim.DKIM(MESSAGE).headers
    results_field = (
        b"Authentication-Results: mx.example.test;\r\n\tspf=pass smtp.mailfrom=alice@example.test;"
        b"\r\n\tdkim=pass header.d=example.test;\r\n\tarc=none;\r\n"
        b"\tdmarc=pass (p=reject dis=none) header.from=example.test\r\n"
    )
    sealer = Sealer(SigningKey(DOMAIN, "s", rsa2048), "mx.example.test")

    def dkimpy_arc() -> list[bytes]:
        return dkim.arc_sign(results_field + MESSAGE, b"s", DOMAIN.encode(), pem,
                             b"mx.example.test", include_headers=include)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("dkimpy rsa-sha256 2048 (pure Python)", dkimpy_rsa),
        ("poste rsa-sha256 2048", Signer([SigningKey(DOMAIN, "s", rsa2048)]).sign),
        ("poste rsa-sha256 3072", Signer([SigningKey(DOMAIN, "s", rsa3072)]).sign),
        ("poste ed25519-sha256", Signer([SigningKey(DOMAIN, "e", ed)]).sign),
        (
            "poste dual rsa 2048 + ed25519 (per mail)",
            Signer([SigningKey(DOMAIN, "s", rsa2048), SigningKey(DOMAIN, "e", ed)]).sign,
        ),
        ("dkimpy arc_sign rsa 2048 (pure Python)", dkimpy_arc),
        ("poste ARC seal rsa 2048 (AMS + AS)", lambda: sealer.seal(results_field + MESSAGE)),
        ("  part: OpenSSL RSA-2048 sign alone", openssl_only),
        ("  part: strict parse check alone", lambda: check_parsable(parsed, DEFAULT_HEADERS)),
    ]
    bound = [
        (name, _bind(fn) if isinstance(getattr(fn, "__self__", None), Signer) else fn)
        for name, fn in cases
    ]
    # Interleaved rounds, best round kept: other processes on the machine then
    # slow a case down in one round, not in all of them.
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name, fn in bound:
            per_s, _n = rate(fn, seconds / ROUNDS)
            best[name] = max(best.get(name, 0.0), per_s)
    results = [(name, best[name], 0) for name, _ in bound]
    base = results[0][1]
    print(
        f"message: {len(MESSAGE)} bytes; {seconds:.0f} s per case in {ROUNDS} rounds"
        " (best round); one thread"
    )
    print(f"{'case':44} {'sign/s':>9} {'ms/mail':>8} {'vs dkimpy':>9}")
    for name, per_s, _ in results:
        print(f"{name:44} {per_s:9.0f} {1000 / per_s:8.3f} {per_s / base:8.1f}x")


def _bind(sign: Callable[[bytes], bytes]) -> Callable[[], bytes]:
    return lambda: sign(MESSAGE)


if __name__ == "__main__":
    main()
