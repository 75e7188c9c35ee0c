"""`poste up`'s assembly in-process: sections can be switched off, the relay can have
its own listener, and `[relay] mailbox` delivers into a folder."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from poste.smtp.client import send_message
from poste.stack.build import build
from poste.stack.config import ConfigError, load, parse
from poste.stack.init import Layout, write_stack


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "mail"
    write_stack(d, Layout(domain="our.test", hostname="mail.our.test",
                          postmaster="admin@elsewhere.test", mailbox="box"))
    return d


async def test_relay_listener_and_mailbox(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    text = (d / "poste.toml").read_text()
    sock = Path(tempfile.mkdtemp(prefix="poste-sock-")) / "relay.sock"  # <= 108 bytes
    text = text.replace('# listen = "127.0.0.1:2526"', 'listen = "127.0.0.1:0"')
    text = text.replace('# local-socket = "/run/poste/relay.sock"', f'local-socket = "{sock}"')
    text = text.replace("[verifier]", "[verifier]\nenabled = false")
    text = text.replace("[submission]", "[submission]\nenabled = false")
    (d / "poste.toml").write_text(text)
    stack = build(load(d / "poste.toml"))
    assert [s.stage.name for s in stack.services] == ["relay", "relay"]
    await stack.start()
    port = stack.services[0].sockname[1]  # it listens on port 0
    try:
        msg = b"From: a@b.test\r\nTo: x@far.test\r\nSubject: t\r\n\r\nhi\r\n"
        # over TCP from this machine: local recipients only; our own hop's socket: anywhere
        refused = await send_message("127.0.0.1", port, "a@b.test", ["x@far.test"], msg)
        assert refused.rcpt_replies["x@far.test"].code == 550
        result = await send_message(str(sock), 0, "a@b.test", ["x@far.test"], msg)
        assert result.data_reply is not None and result.data_reply.code == 250
        for _ in range(200):
            files = list((d / "box").glob("*.eml"))
            if files:
                break
            await asyncio.sleep(0.05)
        assert len(files) == 1
        stored = files[0].read_bytes()
        assert stored.startswith(b"Return-Path: <a@b.test>\r\nDelivered-To: x@far.test\r\n")
        assert stored.endswith(msg)
    finally:
        await stack.stop()
        shutil.rmtree(sock.parent, ignore_errors=True)


def test_relay_cannot_be_disabled(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    with pytest.raises(ConfigError, match="relay"):
        build(parse({"users": str(d / "users"), "domain": ["our.test"],
                     "relay": {"enabled": False, "spool": str(d / "spool")}}))


def test_submission_needs_a_certificate(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    cfg = parse({"users": str(d / "users"), "domain": ["our.test"],
                 "relay": {"spool": str(d / "spool")},
                 "verifier": {"enabled": False},
                 "signer": {"enabled": False},
                 "submission": {"listen": "127.0.0.1:0"}})
    with pytest.raises(ConfigError, match="tls-cert"):
        build(cfg)


def test_relay_takes_the_signers_keys_and_the_verifiers_name(tmp_path: Path) -> None:
    """`poste up`: DSNs are signed with [signer]'s keys, seals carry [verifier]'s results."""
    from poste.services.relay.dsn import FAILED, make_dsn
    from poste.services.relay.spool import Recipient

    d = _folder(tmp_path)
    stack = build(load(d / "poste.toml"), check=True)
    keys = stack.relay.scheduler.own_keys
    assert keys.signer is not None and [k.selector for k in keys.signer.keys] == ["poste"]
    assert stack.relay.stage.seal is not None
    assert stack.relay.stage.seal.sealer.authserv_id == "mail.our.test"  # the verifier's name
    dsn = make_dsn(action=FAILED, reporting_mta="mail.our.test", postmaster_domain="our.test",
                   to="bob@example.org", recipients=[Recipient("x@far.test", "", "x@our.test")],
                   original=b"From: bob@example.org\r\n\r\nhi\r\n", queue_id="Q", arrival=0.0)
    signed = asyncio.run(keys.sign(dsn, "Q"))
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;") and signed.endswith(dsn)
    assert b"d=our.test" in signed[: len(signed) - len(dsn)]
