"""`poste dkim verify` and the verifier service say the same thing about the same mail.

They share one implementation (poste.dkim.verify); this test holds them to it
from the outside.  Each mail goes through `poste verifier` (its
Authentication-Results, as stored by `poste srv`) and through `poste dkim
verify -v` (its `[OK]`/`[ER]`/`[TE]` lines, the result word of the others on
stderr), both asking the same DNS server on loopback.  That server is
fakedns rather than knot because a SERVFAIL for one name is what is tested.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
from pathlib import Path
from typing import Any

import dns.rcode

from poste.dkim import keys as dkim_keys
from poste.dkim.sign import Signer, SigningKey
from poste.dkim.verify import MAX_SIGNATURES
from support.cli import run_poste
from support.dkimkit import DOMAIN, mail, srv_mailbox
from support.fakedns import Answer, fake_dns, records_lookup
from support.service import started
from support.verifierkit import find, header, verifier_args

TAGS = {"OK": "pass", "TE": "temperror"}


def signed(subject: str, *selectors: str, key: dkim_keys.DKIMKey) -> bytes:
    message = mail(subject)
    signer = Signer([SigningKey(DOMAIN, sel, key) for sel in selectors])
    return signer.sign(message) + message


def mails(key: dkim_keys.DKIMKey) -> dict[str, tuple[bytes, list[str], int]]:
    """name -> (mail, the dkim= words expected top first, the CLI's exit code)."""
    good = signed("agree good", "good", key=key)
    many = ["good"] * MAX_SIGNATURES + ["gone", "gone"]  # checking the last two would fail
    return {
        "good": (good, ["pass"], 0),
        "body": (
            signed("agree body", "good", key=key).replace(b"Hi there.", b"Hi there!"),
            ["fail"],
            1,
        ),
        "nxdomain": (signed("agree nxdomain", "gone", key=key), ["permerror"], 1),
        "servfail": (signed("agree servfail", "broken", key=key), ["temperror"], 75),
        "revoked": (signed("agree revoked", "revoked", key=key), ["permerror"], 1),
        "many": (signed("agree many", *many, key=key), ["pass"] * MAX_SIGNATURES, 0),
    }


def from_cli(
    poste_bin: str, ns: str, path: Path, real: bool = True
) -> tuple[list[tuple[str, str]], int, str]:
    """`poste dkim verify -v`: the installed one, or (real=False) poste.cli.main in this process."""
    argv = ["dkim", "verify", "--nameserver", ns, "-v", str(path)]
    r: Any
    if real:
        r = subprocess.run([poste_bin, *argv], capture_output=True, text=True, timeout=60)
    else:
        r = run_poste(argv)
    assert "Traceback" not in r.stderr, r.stderr
    why = [ln for ln in r.stderr.splitlines() if ln.startswith("  ")]
    got = []
    for line in r.stdout.splitlines():
        m = re.fullmatch(r"\[(OK|ER|TE)\]: (\S+)", line)
        assert m, r.stdout
        word = TAGS.get(m.group(1))
        if m.group(1) != "OK":  # -v: "  s._domainkey.d a=...: word, reason"
            said = re.fullmatch(r"  \S+ a=\S+: (\w+), .*", why.pop(0))
            assert said, r.stderr
            assert word in (None, said.group(1)), (line, said.group(0))
            word = said.group(1)
        got.append((word, m.group(2)))
    assert why == [], r.stderr
    return got, r.returncode, r.stderr


def from_verifier(stored: bytes) -> list[tuple[str, str]]:
    ar = header(stored, "Authentication-Results")
    return re.findall(r"dkim=(\w+)[^;]*?header\.d=([^\s;]+)", ar)


def test_cli_and_verifier_agree(tmp_path: Path, poste_bin: str) -> None:
    key = dkim_keys.generate("ed25519")
    table = records_lookup(
        {
            f"good._domainkey.{DOMAIN}": [("TXT", key.txt_value())],
            f"revoked._domainkey.{DOMAIN}": [("TXT", "v=DKIM1; k=ed25519; p=")],
        }
    )

    def lookup(qname: str, qtype: int) -> Answer | None:
        if qname.rstrip(".").lower() == f"broken._domainkey.{DOMAIN}":
            return Answer(rcode=dns.rcode.SERVFAIL)
        return table(qname, qtype)

    cases = mails(key)
    box = tmp_path / "box"
    box.mkdir()
    with (
        fake_dns(lookup) as ns,
        srv_mailbox(poste_bin, box, tmp_path / "srv.log") as srv_port,
    ):
        args = verifier_args(poste_bin, 0, srv_port, tmp_path, ns.nameserver)
        with started(args, tmp_path / "verifier.log") as (_, [port]):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                for message, _, _ in cases.values():
                    assert client.sendmail(f"alice@{DOMAIN}", ["user@our.test"], message) == {}
        for i, (name, (message, expected, code)) in enumerate(cases.items()):
            path = tmp_path / f"{name}.eml"
            path.write_bytes(message)
            # the first through the installed `poste`, the others in this process
            cli, returncode, stderr = from_cli(poste_bin, ns.nameserver, path, real=i == 0)
            subject = message.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]
            verifier = from_verifier(find(box, b"Subject: " + subject + b"\r\n"))
            assert cli == verifier, (name, cli, verifier)
            assert [word for word, _ in cli] == expected, (name, cli)
            assert {domain for _, domain in cli} == {DOMAIN}, (name, cli)
            assert returncode == code, (name, returncode, stderr)
            if name == "many":
                assert "2 more DKIM-Signature fields not checked" in stderr, stderr
    assert ns.errors == []
