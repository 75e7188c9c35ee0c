"""A second ARC validator (RFC 8617), written from the RFC for the tests, sharing no code with dkimpy.

poste seals with dkimpy and the validators at hand (dkimpy's `arc_verify`,
authheaders, which calls it) are dkimpy too, and Debian 12 has no OpenARC: a
mistake dkimpy made on both sides would pass them all.  This one follows RFC
8617 5.2 and RFC 6376 3.4 (relaxed canonicalisation) with `cryptography`
alone: the newest ARC-Message-Signature over its `h=` fields and the body,
and every ARC-Seal over the sets up to its own, in instance order (AAR, AMS,
AS each), its own `b=` emptied.  Enough for the chains poste makes
(rsa-sha256, relaxed/relaxed); not a general validator.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

_ARC = ("arc-authentication-results", "arc-message-signature", "arc-seal")


def _fields(head: bytes) -> list[tuple[str, bytes]]:
    """(name, raw field with its CRLF folding, without the last CRLF), top first."""
    out: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + b"\r\n" + line)
        elif line:
            out.append((line.split(b":", 1)[0].strip().lower().decode(), line))
    return out


def _relaxed_header(raw: bytes) -> bytes:
    name, _, value = raw.partition(b":")
    value = re.sub(rb"\r\n", b"", value)
    value = re.sub(rb"[ \t]+", b" ", value).strip(b" ")
    return name.strip().lower() + b":" + value


def _relaxed_body(body: bytes) -> bytes:
    lines = [re.sub(rb"[ \t]+", b" ", ln).rstrip(b" ") for ln in body.split(b"\r\n")]
    while lines and lines[-1] == b"":
        lines.pop()
    return b"".join(ln + b"\r\n" for ln in lines)


def _tags(raw: bytes) -> dict[str, str]:
    value = raw.partition(b":")[2].decode()
    out = {}
    for part in value.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out[k.strip()] = "".join(v.split())
    return out


def _without_b(raw: bytes) -> bytes:
    return re.sub(rb"(;[ \t\r\n]*b[ \t\r\n]*=)[^;]*", rb"\1", raw)


def _verify(txt: Callable[[str], str | None], tags: dict[str, str], data: bytes) -> bool:
    record = txt(f"{tags['s']}._domainkey.{tags['d']}") or ""
    key_b64 = dict((k.strip(), v.strip()) for k, _, v in (p.partition("=") for p in record.split(";"))).get("p", "")
    key = serialization.load_der_public_key(base64.b64decode(key_b64))
    assert isinstance(key, rsa.RSAPublicKey)
    try:
        key.verify(base64.b64decode(tags["b"]), data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def validate(mail: bytes, txt: Callable[[str], str | None]) -> str:
    """`pass`, `fail` or `none` for the ARC chain of `mail` (CRLF line ends)."""
    head, _, body = mail.partition(b"\r\n\r\n")
    fields = _fields(head)
    sets: dict[int, dict[str, bytes]] = {}
    for name, raw in fields:
        if name in _ARC:
            instance = int(_tags(raw)["i"])
            if name in sets.setdefault(instance, {}):
                return "fail"  # two fields of one kind in one set
            sets[instance][name] = raw
    if not sets:
        return "none"
    newest = max(sets)
    if sorted(sets) != list(range(1, newest + 1)) or any(len(s) != 3 for s in sets.values()):
        return "fail"
    # the newest AMS: like a DKIM signature (RFC 6376 3.7), relaxed/relaxed
    ams_raw = sets[newest]["arc-message-signature"]
    ams = _tags(ams_raw)
    if ams.get("a") != "rsa-sha256" or ams.get("c", "relaxed/relaxed") != "relaxed/relaxed":
        return "fail"
    if base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()).decode() != ams["bh"]:
        return "fail"
    unused = [(n, raw) for n, raw in fields]
    signed = b""
    for name in (h.strip().lower() for h in ams["h"].split(":")):
        for i in range(len(unused) - 1, -1, -1):  # the last unused instance, from the bottom
            if unused[i][0] == name:
                signed += _relaxed_header(unused.pop(i)[1]) + b"\r\n"
                break
    signed += _relaxed_header(_without_b(ams_raw))
    if not _verify(txt, ams, signed):
        return "fail"
    # every AS over the sets 1..i (RFC 8617 5.1.1), cv= none for i=1 and pass after
    for i in range(1, newest + 1):
        seal = _tags(sets[i]["arc-seal"])
        if seal.get("cv") != ("none" if i == 1 else "pass") or "h" in seal:
            return "fail"
        data = b""
        for j in range(1, i + 1):
            for name in _ARC:
                raw = sets[j][name]
                if j == i and name == "arc-seal":
                    data += _relaxed_header(_without_b(raw))
                else:
                    data += _relaxed_header(raw) + b"\r\n"
        if not _verify(txt, seal, data):
            return "fail"
    return "pass"
