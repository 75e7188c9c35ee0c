"""`poste verifier` end to end: swaks -> verifier -> `poste srv`, zones served by knot.

swaks connects from 127.0.0.10 (or .11) with STARTTLS; the test zone
publishes sender.test's SPF (`ip4:127.0.0.10 -all`), its DKIM key and a DMARC
policy, an SPF record for a HELO name that allows nobody, and the reverse
zone of 127.0.0.0/24 (127.0.0.10 is forward-confirmed, 127.0.0.11's PTR name
points elsewhere).  What arrives at `poste srv` must carry the labels a user
would read.
"""

from __future__ import annotations

import base64
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support.cli import run_poste
from support.dkimkit import srv_mailbox
from support.fakedns import DROP, fake_dns
from support.knot import knot_server, simple_zone
from support.net import free_port
from support.service import started
from support.verifierkit import find, header, mail, swaks, swaks_args, verifier_args

pytestmark = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks missing")

SELECTOR = "s2024"


def _split(value: str) -> str:
    return " ".join(f'"{value[i : i + 200]}"' for i in range(0, len(value), 200))


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def zones(key: rsa.RSAPrivateKey) -> dict[str, str]:
    pub = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    dkim_txt = f"v=DKIM1; k=rsa; p={base64.b64encode(pub).decode()}"
    return {
        "sender.test": simple_zone(
            "sender.test",
            '@ TXT "v=spf1 ip4:127.0.0.10 -all"\n'
            f"{SELECTOR}._domainkey TXT {_split(dkim_txt)}\n"
            '_dmarc TXT "v=DMARC1; p=reject"\n'
            'mail TXT "v=spf1 ip4:127.0.0.10 -all"\n'
            'badhelo TXT "v=spf1 -all"\n'
            "client A 127.0.0.10\n"
            "liar A 127.0.0.99\n",
        ),
        "nospf.test": simple_zone("nospf.test", "@ A 192.0.2.1\n"),
        "0.0.127.in-addr.arpa": simple_zone(
            "0.0.127.in-addr.arpa",
            "10 PTR client.sender.test.\n11 PTR liar.sender.test.\n",
        ),
    }


def sign(message: bytes, key: rsa.RSAPrivateKey) -> bytes:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    field = dkim.sign(
        message,
        SELECTOR.encode(),
        b"sender.test",
        pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        linesep=b"\r\n",
    )
    return bytes(field) + message


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, poste_bin: str, key: rsa.RSAPrivateKey
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("verifier")
    box = tmp / "box"
    with (
        knot_server(tmp / "knot", zones(key)) as ns,
        srv_mailbox(poste_bin, box, tmp / "srv.log") as srv_port,
        started(verifier_args(poste_bin, 0, srv_port, tmp, ns.nameserver),
                tmp / "verifier.log") as (_, [port]),
    ):
        yield {"port": port, "box": box, "tmp": tmp, "srv_port": srv_port, "ns": ns}


def test_signed_mail_from_allowed_ip_passes_everything(stack: dict[str, Any], key: Any) -> None:
    r = swaks(stack["port"], sign(mail("all pass"), key), stack["tmp"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "STARTTLS" in r.stdout
    stored = find(stack["box"], b"Subject: all pass")
    spf = header(stored, "Received-SPF")
    assert spf.startswith("pass ")
    assert "client-ip=127.0.0.10;" in spf
    assert 'envelope-from="someone@sender.test"' in spf
    assert "receiver=mx.our.test" in spf and "identity=mailfrom" in spf
    ar = header(stored, "Authentication-Results")
    assert ar.startswith("mx.our.test;")
    assert "spf=pass smtp.mailfrom=someone@sender.test" in ar
    assert "dkim=pass header.d=sender.test header.s=s2024" in ar
    assert "dmarc=pass" in ar and "header.from=sender.test" in ar
    # our fields sit above the verifier's Received:, the message follows intact
    fields = [ln.split(":")[0] for ln in stored.decode().split("\r\n")[:12] if ln[:1].isalpha()]
    assert fields[:4] == ["Received", "Received-SPF", "Authentication-Results", "Received"]


def test_other_ip_fails_spf(stack: dict[str, Any], key: Any) -> None:
    r = swaks(stack["port"], sign(mail("from eleven"), key), stack["tmp"], source="127.0.0.11")
    assert r.returncode == 0, r.stdout + r.stderr
    stored = find(stack["box"], b"Subject: from eleven")
    assert header(stored, "Received-SPF").startswith("fail ")
    ar = header(stored, "Authentication-Results")
    assert "spf=fail" in ar
    assert "dkim=pass" in ar and "dmarc=pass" in ar  # DKIM still aligns: DMARC passes


def test_tampered_body_fails_dkim(stack: dict[str, Any], key: Any) -> None:
    signed = sign(mail("tampered", body="Pay 10 euros.\r\n"), key)
    r = swaks(stack["port"], signed.replace(b"10 euros", b"99 euros"), stack["tmp"])
    assert r.returncode == 0, r.stdout + r.stderr
    ar = header(find(stack["box"], b"Subject: tampered"), "Authentication-Results")
    assert "spf=pass" in ar
    assert "dkim=fail" in ar and "header.d=sender.test" in ar
    assert "dmarc=pass" in ar  # SPF aligns


def test_sender_without_spf_is_none(stack: dict[str, Any]) -> None:
    msg = mail("no spf", sender="someone@nospf.test")
    r = swaks(stack["port"], msg, stack["tmp"], sender="someone@nospf.test")
    assert r.returncode == 0, r.stdout + r.stderr
    stored = find(stack["box"], b"Subject: no spf")
    assert header(stored, "Received-SPF").startswith("none ")
    ar = header(stored, "Authentication-Results")
    assert "spf=none" in ar and "dkim=none" in ar and "dmarc=none" in ar


def test_foreign_recipient_refused_and_nothing_forwarded(stack: dict[str, Any], key: Any) -> None:
    r = swaks(stack["port"], mail("not ours"), stack["tmp"], to="someone@elsewhere.test")
    assert r.returncode != 0
    assert "550 5.7.1" in r.stdout
    # a later mail arrives; the refused one never does
    swaks(stack["port"], sign(mail("after refusal"), key), stack["tmp"])
    find(stack["box"], b"Subject: after refusal")
    for path in stack["box"].glob("*.eml"):
        assert b"Subject: not ours" not in path.read_bytes()


def test_postmaster_and_null_sender_accepted(stack: dict[str, Any]) -> None:
    for n, to in enumerate(["postmaster@our.test", "postmaster@other.test", "hostmaster@our.test"]):
        msg = mail(f"bounce {n}", sender="mailer-daemon@sender.test")
        r = swaks(stack["port"], msg, stack["tmp"], sender="<>", to=to)
        assert r.returncode == 0, r.stdout + r.stderr
        stored = find(stack["box"], f"Subject: bounce {n}".encode())
        spf = header(stored, "Received-SPF")
        assert "identity=helo" in spf and "helo=client.sender.test" in spf


def test_unparseable_mail_passes_byte_identical(stack: dict[str, Any]) -> None:
    # No valid header section at all: a line without a colon, 8-bit junk, a broken From.
    weird = (
        b"From: <\r\n"
        b"this line has no colon \xff\xfe\r\n"
        b"Subject: unparseable \xc3\x28\r\n"
        b"DKIM-Signature: v=1; garbage\r\n"
        b"\r\n"
        b"body \x01 with a control byte and \xff bytes\r\n"  # NUL is refused: test_core_smtp
        b"..leading dot line\r\n"
    )
    # smtplib sends the bytes as they are (swaks would add a CRLF of its own)
    with smtplib.SMTP("127.0.0.1", stack["port"], source_address=("127.0.0.10", 0)) as c:
        c.starttls(context=ssl._create_unverified_context())
        refused = c.sendmail("someone@sender.test", ["user@our.test"], weird)
    assert refused == {}
    stored = find(stack["box"], b"Subject: unparseable")
    assert stored.endswith(weird)
    ar = header(stored, "Authentication-Results")
    assert "dkim=permerror" in ar and "dmarc=permerror" in ar
    # everything above the original mail is ours or a Received:
    above = stored[: -len(weird)].decode("ascii")
    names = [ln.split(":", 1)[0] for ln in above.split("\r\n") if ln and ln[0] not in " \t"]
    assert set(names) <= {"Received", "Received-SPF", "Authentication-Results"}


def test_dead_nameserver_gives_temperror_and_mail_passes(
    tmp_path: Path, poste_bin: str, stack: dict[str, Any], key: Any
) -> None:
    dead = free_port()  # nothing listens there
    args = verifier_args(poste_bin, 0, stack["srv_port"], tmp_path, f"127.0.0.1:{dead}")
    with started([*args, "--dns-timeout", "0.5"], tmp_path / "v.log") as (_, [port]):
        r = swaks(port, sign(mail("dead dns"), key), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    stored = find(stack["box"], b"Subject: dead dns")
    assert header(stored, "Received-SPF").startswith("temperror ")
    ar = header(stored, "Authentication-Results")
    assert "spf=temperror" in ar and "dkim=temperror" in ar and "dmarc=temperror" in ar


def test_reject_failures_refuses_spf_fail_and_dmarc_reject(
    tmp_path: Path, poste_bin: str, stack: dict[str, Any], key: Any
) -> None:
    args = [*verifier_args(poste_bin, 0, stack["srv_port"], tmp_path, stack["ns"].nameserver)]
    with started([*args, "--reject-failures"], tmp_path / "v.log") as (_, [port]):
        # SPF fail (from .11) is refused at the end of DATA
        r = swaks(port, sign(mail("refused spf"), key), tmp_path, source="127.0.0.11")
        assert r.returncode != 0
        assert "550 5.7.23" in r.stdout
        # DMARC fail under p=reject: unsigned, envelope from a domain without SPF
        r = swaks(port, mail("refused dmarc"), tmp_path, sender="x@nospf.test")
        assert r.returncode != 0
        assert "550 5.7.1" in r.stdout and "DMARC" in r.stdout
        # SPF pass (aligned) still goes through, signed or not, intact body or not
        r = swaks(port, mail("signed ok"), tmp_path)
        assert r.returncode == 0, r.stdout
        r = swaks(
            port,
            sign(mail("tampered but spf ok", body="a\r\n"), key).replace(b"a\r\n", b"b\r\n"),
            tmp_path,
        )
        assert r.returncode == 0, r.stdout  # DMARC passes through aligned SPF
    find(stack["box"], b"Subject: signed ok")
    find(stack["box"], b"Subject: tampered but spf ok")
    for p in stack["box"].glob("*.eml"):
        assert b"refused spf" not in p.read_bytes() and b"refused dmarc" not in p.read_bytes()


def test_require_tls(tmp_path: Path, poste_bin: str, stack: dict[str, Any]) -> None:
    args = [*verifier_args(poste_bin, 0, stack["srv_port"], tmp_path, stack["ns"].nameserver)]
    with started([*args, "--require-tls"], tmp_path / "v.log") as (_, [port]):
        r = swaks(port, mail("plain text"), tmp_path, tls=False)
        assert r.returncode != 0 and "530" in r.stdout
        r = swaks(port, mail("over tls"), tmp_path)
        assert r.returncode == 0, r.stdout
    find(stack["box"], b"Subject: over tls")


def test_spf_check_tool(stack: dict[str, Any], poste_bin: str) -> None:
    ns = stack["ns"].nameserver

    def spf(*args: str) -> Any:
        """`poste spf check` in this process (poste.cli.main)."""
        return run_poste(["spf", "check", "--nameserver", ns, *args])

    # Once through the installed entry point, the other cases in this process.
    real = subprocess.run([poste_bin, "spf", "check", "--nameserver", ns, "--ip", "127.0.0.10",
                           "--sender", "a@sender.test"], capture_output=True, text=True, timeout=60)
    assert real.stdout == "pass\n", real.stderr
    assert spf("--ip", "127.0.0.10", "--sender", "a@sender.test").stdout == "pass\n"
    assert spf("--ip", "127.0.0.11", "--sender", "a@sender.test").stdout == "fail\n"
    assert spf("--ip", "127.0.0.11", "--sender", "a@nospf.test").stdout == "none\n"
    r = spf("--ip", "127.0.0.10", "--sender", "a@sender.test", "--header", "--receiver", "mx.x")
    assert r.stdout.startswith("Received-SPF: pass (mx.x: domain of sender.test designates")
    assert "client-ip=127.0.0.10; envelope-from=" in r.stdout
    r = spf("--ip", "not-an-ip", "--sender", "a@sender.test")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def _with_helo(args: list[str], helo: str) -> list[str]:
    """A swaks command line greeting with another HELO name than the kit's."""
    out = list(args)
    out[out.index("--helo") + 1] = helo
    return out


def _our_received(stored: bytes) -> str:
    """The verifier's own `Received:` field (by mx.our.test), unfolded."""
    head = stored.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ")
    ours = [ln for ln in unfolded.split("\r\n") if ln.startswith("Received: ") and "by mx." in ln]
    assert len(ours) == 1, head
    return ours[0]


def test_helo_fail_decides_received_spf(stack: dict[str, Any], key: Any) -> None:
    args = _with_helo(
        swaks_args(stack["port"], sign(mail("helo fails"), key), stack["tmp"]),
        "badhelo.sender.test",
    )
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    stored = find(stack["box"], b"Subject: helo fails")
    spf = header(stored, "Received-SPF")
    assert spf.startswith("fail (mx.our.test: helo badhelo.sender.test does not designate")
    assert "identity=helo" in spf and "helo=badhelo.sender.test" in spf
    ar = header(stored, "Authentication-Results")
    assert "spf=pass smtp.mailfrom=someone@sender.test;" in ar
    assert "spf=fail smtp.helo=badhelo.sender.test;" in ar
    assert "dmarc=pass" in ar


def test_helo_checked_alongside_mailfrom(stack: dict[str, Any], key: Any) -> None:
    r = swaks(stack["port"], sign(mail("helo none"), key), stack["tmp"])
    assert r.returncode == 0, r.stdout + r.stderr
    stored = find(stack["box"], b"Subject: helo none")
    assert "identity=mailfrom" in header(stored, "Received-SPF")
    ar = header(stored, "Authentication-Results")
    assert "spf=pass smtp.mailfrom=someone@sender.test;" in ar
    assert "spf=none smtp.helo=client.sender.test;" in ar  # no SPF record for the HELO name


def test_received_names_only_a_forward_confirmed_peer(stack: dict[str, Any], key: Any) -> None:
    r = swaks(stack["port"], sign(mail("named peer"), key), stack["tmp"])
    assert r.returncode == 0, r.stdout + r.stderr
    received = _our_received(find(stack["box"], b"Subject: named peer"))
    assert received.startswith(
        "Received: from client.sender.test (client.sender.test [127.0.0.10])"
    )
    # 127.0.0.11's PTR says liar.sender.test, whose A record is another address
    r = swaks(stack["port"], sign(mail("liar peer"), key), stack["tmp"], source="127.0.0.11")
    assert r.returncode == 0, r.stdout + r.stderr
    received = _our_received(find(stack["box"], b"Subject: liar peer"))
    assert received.startswith("Received: from client.sender.test ([127.0.0.11])")
    assert "liar" not in received


def test_nameserver_that_drops_queries_gives_temperror_and_mail_passes(
    tmp_path: Path, poste_bin: str, stack: dict[str, Any], key: Any
) -> None:
    """No answer at all (not a refusal): every lookup waits out --dns-timeout, then temperror."""
    with fake_dns(lambda qname, qtype: DROP) as silent:
        args = verifier_args(poste_bin, 0, stack["srv_port"], tmp_path, silent.nameserver)
        with started([*args, "--dns-timeout", "0.5"], tmp_path / "v.log") as (_, [port]):
            r = swaks(port, sign(mail("silent dns"), key), tmp_path)
        asked = {qtype for _, qtype in silent.queries}
    assert r.returncode == 0, r.stdout + r.stderr
    stored = find(stack["box"], b"Subject: silent dns")
    assert header(stored, "Received-SPF").startswith("temperror ")
    ar = header(stored, "Authentication-Results")
    assert "spf=temperror smtp.mailfrom=someone@sender.test;" in ar
    assert "spf=temperror smtp.helo=client.sender.test;" in ar
    assert "dkim=temperror" in ar and "dmarc=temperror" in ar
    assert _our_received(stored).startswith("Received: from client.sender.test ([127.0.0.10])")
    assert {"TXT", "PTR"} <= asked  # the queries went out and were dropped


def test_psl_file_changes_organisational_domains(
    tmp_path: Path, poste_bin: str, stack: dict[str, Any]
) -> None:
    """A fresher list that makes sender.test a public suffix: mail.sender.test no longer aligns."""
    psl = tmp_path / "public_suffix_list.dat"
    psl.write_text(
        "// ===BEGIN ICANN DOMAINS===\ncom\nuk\nco.uk\n// ===END ICANN DOMAINS===\n"
        "// ===BEGIN PRIVATE DOMAINS===\nsender.test\n// ===END PRIVATE DOMAINS===\n"
    )
    msg = mail("bounce domain aligned")
    r = swaks(stack["port"], msg, stack["tmp"], sender="bounce@mail.sender.test")
    assert r.returncode == 0, r.stdout + r.stderr
    ar = header(find(stack["box"], b"Subject: bounce domain aligned"), "Authentication-Results")
    assert "spf=pass smtp.mailfrom=bounce@mail.sender.test" in ar and "dmarc=pass" in ar

    args = verifier_args(poste_bin, 0, stack["srv_port"], tmp_path, stack["ns"].nameserver)
    with started([*args, "--psl", str(psl)], tmp_path / "v.log") as (_, [port]):
        r = swaks(port, mail("bounce domain apart"), tmp_path, sender="bounce@mail.sender.test")
    assert r.returncode == 0, r.stdout + r.stderr
    ar = header(find(stack["box"], b"Subject: bounce domain apart"), "Authentication-Results")
    assert "spf=pass smtp.mailfrom=bounce@mail.sender.test" in ar
    assert "dmarc=fail" in ar and "header.from=sender.test" in ar
