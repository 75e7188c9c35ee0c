"""The sending path's hops keep their sessions: `poste submission`, `poste signer` and
`poste forward` as processes, each in front of an in-test server that counts the
sessions it was opened.

Five mails, each from a client session of its own, reach the next hop over one kept
session (issue 16, item 5: separate processes pay little for being separate); each is
still refused or accepted as before (the login's own sender only, DKIM signatures).
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import aiosmtplib
import dkim
import pytest

from poste.dkim import keys
from poste.smtp.client import send_message
from poste.smtp.stage import Stage
from poste.smtp.tls import self_signed
from poste.tools.srv import Mailbox, MailboxHop
from poste.users import passwords, store
from support.dkimkit import DOMAIN, mail
from support.service import started
from support.smtp import running

HOST = "127.0.0.1"
PASSWORD = "kept-Sessions-42"


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def test_signer_keeps_one_session_to_the_relay(tmp_path: Path, poste_bin: str) -> None:
    key = keys.generate("rsa")
    keys.write_key(key, tmp_path / "k.pem")
    box = tmp_path / "box"
    async with running(Stage(), MailboxHop(Mailbox(str(box) + "/", 0, with_data=True))) as nxt:
        args = [poste_bin, "signer", "--domain", DOMAIN, "--selector", "k",
                "--private-key", str(tmp_path / "k.pem"), "--listen", f"{HOST}:0",
                "--destination", f"{nxt.sockname[0]}:{nxt.sockname[1]}", "--hostname", "signer.test"]
        with started(args, tmp_path / "signer.log") as (_, [port]):
            seen: set[object] = set()
            for i in range(5):
                r = await send_message(HOST, port, f"a@{DOMAIN}", ["b@remote.test"],
                                       mail(f"kept {i}"))
                assert r.data_reply is not None and r.data_reply.ok, r
                seen |= set(nxt.connections)
            assert len(seen) == 1  # five client sessions, one session at the next hop
    stored = [p.read_bytes() for p in box.glob("*.eml")]
    assert len(stored) == 5
    record = {f"k._domainkey.{DOMAIN}.".encode(): key.txt_value().encode()}
    for m in stored:
        assert dkim.DKIM(m).verify(0, dnsfunc=lambda name, timeout=5: record.get(name))


async def test_submission_keeps_one_session_to_the_signer(tmp_path: Path,
                                                           poste_bin: str) -> None:
    cert, tls_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, tls_key, "mail.test")
    repo = tmp_path / "users"
    entry = {"targets": ["alice@elsewhere.test"], "insecure": False,
             "password": passwords.hash_password(PASSWORD)}
    store.commit_file(repo, "alice", json.dumps(entry).encode(), "add alice", create=True)
    box = tmp_path / "box"
    async with running(Stage(), MailboxHop(Mailbox(str(box) + "/", 0, with_data=True))) as nxt:
        args = [poste_bin, "submission", "--domain", DOMAIN, "--users", str(repo),
                "--destination", f"{nxt.sockname[0]}:{nxt.sockname[1]}", "--tls-cert", str(cert),
                "--tls-key", str(tls_key), "--listen", f"{HOST}:0",
                "--hostname", "submission.test", "--auth-state", str(tmp_path / "auth.json")]
        with started(args, tmp_path / "submission.log") as (_, [port]):
            seen: set[object] = set()
            for i in range(5):
                r = await send_message(HOST, port, f"alice@{DOMAIN}", ["b@remote.test"],
                                       mail(f"kept {i}"), starttls=True,
                                       tls_context=_insecure(), username=f"alice@{DOMAIN}",
                                       password=PASSWORD)
                assert r.data_reply is not None and r.data_reply.ok, r
                seen |= set(nxt.connections)
            # someone else's sender is still refused on a session whose hop is kept
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await send_message(HOST, port, f"bob@{DOMAIN}", ["b@remote.test"],
                                   mail("not alice"), starttls=True, tls_context=_insecure(),
                                   username=f"alice@{DOMAIN}", password=PASSWORD)
            assert refused.value.code == 553
            assert len(seen) == 1
    assert len(list(box.glob("*.eml"))) == 5



async def test_forward_keeps_one_session(tmp_path: Path, poste_bin: str) -> None:
    box = tmp_path / "box"
    async with running(Stage(), MailboxHop(Mailbox(str(box) + "/", 0, with_data=True))) as nxt:
        args = [poste_bin, "forward", "--listen", f"{HOST}:0",
                "--destination", f"{nxt.sockname[0]}:{nxt.sockname[1]}", "--hostname", "forward.test"]
        with started(args, tmp_path / "forward.log") as (_, [port]):
            seen: set[object] = set()
            for i in range(5):
                r = await send_message(HOST, port, "a@x.test", ["b@remote.test"], mail(f"f {i}"))
                assert r.data_reply is not None and r.data_reply.ok, r
                seen |= set(nxt.connections)
            assert len(seen) == 1
    assert len(list(box.glob("*.eml"))) == 5
