"""`poste signer` end to end: client -> signer -> `poste srv`, keys served by knot.

The stored mail must pass Debian's `opendkim-testmsg` for the RSA and the
ed25519 signature (each checked alone), a tampered copy must fail, and a mail
the parser rejects must come out unsigned and otherwise byte-identical.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from support import opendkim
from support.cli import run_poste
from support.dkimkit import (
    DOMAIN,
    dkim_zone_records,
    mail,
    make_key,
    wait_file,
    without_signatures_except,
)
from support.knot import knot_server, simple_zone
from support.service import started

pytestmark = pytest.mark.skipif(not opendkim.available(), reason="opendkim-testmsg missing")


def top_fields(message: bytes) -> list[bytes]:
    """Names of the fields above the original mail, top first."""
    names = []
    for line in message.split(b"\r\n"):
        if not line or line[:1] in (b" ", b"\t"):
            continue
        names.append(line.split(b":", 1)[0].lower())
    return names


def strip_trace(stored: bytes) -> bytes:
    """Drop the Received/DKIM-Signature fields the hops prepended."""
    lines = stored.split(b"\r\n")
    i = 0
    while i < len(lines):
        name = lines[i].split(b":", 1)[0].lower()
        if name in (b"received", b"dkim-signature"):
            i += 1
            while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
                i += 1
        else:
            break
    return b"\r\n".join(lines[i:])


@pytest.fixture
def stack(tmp_path: Path, poste_bin: str):  # type: ignore[no-untyped-def]
    """knot (port 53 of its own loopback address) + srv + signer with an RSA and an ed25519 key."""
    rsa_path, rsa_key = make_key(tmp_path, "rsa", "rsa2024")
    ed_path, ed_key = make_key(tmp_path, "ed25519", "ed2024")
    zone = simple_zone(DOMAIN, dkim_zone_records([("rsa2024", rsa_key), ("ed2024", ed_key)]))
    ns_host = opendkim.port53_host()
    box = tmp_path / "box"
    with (
        knot_server(tmp_path / "knot", {DOMAIN: zone}, host=ns_host, port=53) as ns,
        started(
            [poste_bin, "srv", "127.0.0.1:0", "-o", f"{box}/", "--count", "10"],
            tmp_path / "srv.log",
        ) as (_, [srv_port]),
        started(
            [
                poste_bin,
                "signer",
                "--domain",
                DOMAIN,
                "--selector",
                "rsa2024",
                "--private-key",
                str(rsa_path),
                "--selector",
                "ed2024",
                "--private-key",
                str(ed_path),
                "--destination",
                f"127.0.0.1:{srv_port}",
                "--listen",
                "127.0.0.1:0",
                "--hostname",
                "signer.example.test",
            ],
            tmp_path / "signer.log",
        ) as (_, [signer_port]),
    ):
        yield {"ns": ns, "signer_port": signer_port, "box": box, "tmp": tmp_path}


def swaks_send(port: int, message: bytes, tmp: Path) -> subprocess.CompletedProcess[str]:
    data = tmp / "swaks.eml"
    data.write_bytes(message)
    return subprocess.run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(port),
            "--from",
            f"alice@{DOMAIN}",
            "--to",
            "bob@remote.test",
            "--data",
            f"@{data}",
            "--helo",
            "client.example.test",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks missing")
def test_signed_mail_passes_opendkim_for_each_algorithm(stack, poste_bin: str) -> None:  # type: ignore[no-untyped-def]
    tmp: Path = stack["tmp"]
    r = swaks_send(stack["signer_port"], mail("via swaks"), tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    stored = wait_file(stack["box"] / "1.eml")

    # srv's Received, our two signatures, the signer's Received, then the mail
    assert top_fields(stored)[:4] == [
        b"received",
        b"dkim-signature",
        b"dkim-signature",
        b"received",
    ]
    assert b"a=rsa-sha256" in stored and b"a=ed25519-sha256" in stored

    odk = tmp / "odk"
    ns_ip = stack["ns"].host
    for alg in ("rsa-sha256", "ed25519-sha256"):
        alone = without_signatures_except(stored, alg)
        assert alone.count(b"DKIM-Signature:") == 1
        ok = opendkim.testmsg(alone, ns_ip, odk)
        assert ok.returncode == 0 and not ok.stderr, (alg, ok.stderr)
        tampered = alone.replace(b"Hi there.", b"Hi thera.")
        bad = opendkim.testmsg(tampered, ns_ip, odk)
        assert bad.returncode != 0, alg
        assert b"Bad signature" in bad.stderr, bad.stderr

    # both signatures together, and our own verifier against the same DNS
    assert opendkim.testmsg(stored, ns_ip, odk).returncode == 0
    path = tmp / "stored.eml"
    path.write_bytes(stored)
    v = subprocess.run(
        [poste_bin, "dkim", "verify", "--nameserver", stack["ns"].nameserver, str(path)],
        capture_output=True,
        text=True,
    )
    assert v.returncode == 0 and v.stdout == f"[OK]: {DOMAIN}\n[OK]: {DOMAIN}\n"
    path.write_bytes(stored.replace(b"Subject: via swaks", b"Subject: via swakz"))
    v = run_poste(["dkim", "verify", "--nameserver", stack["ns"].nameserver, str(path)])
    assert v.returncode == 1 and v.stdout == f"[ER]: {DOMAIN}\n[ER]: {DOMAIN}\n"


def send_to_signer(poste_bin: str, src: Path, port: int) -> None:
    r = subprocess.run(
        [poste_bin, "send", str(src), f"127.0.0.1:{port}", "-s", f"alice@{DOMAIN}",
         "-r", "bob@remote.test"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def test_unparsable_mail_goes_on_unsigned_and_byte_identical(stack, poste_bin: str) -> None:  # type: ignore[no-untyped-def]
    tmp: Path = stack["tmp"]
    broken = mail("broken").replace(b"From: Alice <alice@example.test>", b"From: <")
    src = tmp / "broken.eml"
    src.write_bytes(broken)
    send_to_signer(poste_bin, src, stack["signer_port"])
    stored = wait_file(stack["box"] / "1.eml")
    assert b"DKIM-Signature" not in stored
    assert top_fields(stored)[:2] == [b"received", b"received"]
    assert strip_trace(stored) == broken
    log = (tmp / "signer.log").read_text()
    assert "not signed, passed on as is" in log

    # the next, well-formed mail on the same signer is signed again
    src.write_bytes(mail("fine"))
    send_to_signer(poste_bin, src, stack["signer_port"])
    second = wait_file(stack["box"] / "2.eml")
    assert second.count(b"DKIM-Signature:") == 2
    assert strip_trace(second) == mail("fine")
