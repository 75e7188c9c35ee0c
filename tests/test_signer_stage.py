"""The signer stage in process: concurrent mails, and chained behind another stage (`poste up`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dkim

from poste.dkim import keys
from poste.dkim.sign import Signer, SigningKey
from poste.services.signer.service import INLINE_BYTES, SignerStage, signs_inline
from poste.smtp.chain import StageHop
from poste.smtp.client import send_message
from poste.smtp.stage import Stage
from poste.tools.srv import Mailbox, MailboxHop
from support.dkimkit import DOMAIN, mail
from support.smtp import running


def lookup_for(*pairs: tuple[str, keys.DKIMKey]):  # type: ignore[no-untyped-def]
    table = {f"{s}._domainkey.{DOMAIN}.".encode(): k.txt_value().encode() for s, k in pairs}
    return lambda name, timeout=5: table.get(name)


def stored_mails(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in folder.glob("*.eml")]


async def test_concurrent_mails_are_each_signed(tmp_path: Path) -> None:
    rsa_key, ed_key = keys.generate("rsa"), keys.generate("ed25519")
    signer = Signer([SigningKey(DOMAIN, "r", rsa_key), SigningKey(DOMAIN, "e", ed_key)])
    box = Mailbox(str(tmp_path) + "/", 0, with_data=False)
    async with running(SignerStage(signer), MailboxHop(box)) as svc:
        host, port = svc.sockname
        results = await asyncio.gather(
            *(
                send_message(host, port, f"a@{DOMAIN}", ["b@remote.test"], mail(f"n{i}"))
                for i in range(12)
            )
        )
    assert all(r.data_reply is not None and r.data_reply.ok for r in results)
    stored = stored_mails(tmp_path)
    assert len(stored) == 12
    lookup = lookup_for(("r", rsa_key), ("e", ed_key))
    for m in stored:
        assert m.count(b"DKIM-Signature:") == 2
        assert dkim.DKIM(m).verify(0, dnsfunc=lookup) and dkim.DKIM(m).verify(1, dnsfunc=lookup)


async def test_chained_behind_another_stage(tmp_path: Path) -> None:
    """As in `poste up`: submission-like stage -> signer stage -> mailbox, one socket in."""
    ed_key = keys.generate("ed25519")
    box = Mailbox(str(tmp_path) + "/", 0, with_data=False)
    signer_hop = StageHop(
        SignerStage(Signer([SigningKey(DOMAIN, "e", ed_key)])),
        MailboxHop(box),
        hostname="signer.test",
        peer_helo="front.test",
    )
    async with running(Stage(), signer_hop) as svc:
        r = await send_message(*svc.sockname, f"a@{DOMAIN}", ["b@remote.test"], mail("chained"))
    assert r.data_reply is not None and r.data_reply.ok
    (stored,) = stored_mails(tmp_path)
    names = [line.split(b":")[0] for line in stored.split(b"\r\n") if line[:1] not in b" \t"]
    # the signer's fields sit above its Received:, above the front stage's Received:
    assert names[:3] == [b"DKIM-Signature", b"Received", b"Received"]
    assert dkim.DKIM(stored).verify(0, dnsfunc=lookup_for(("e", ed_key)))


async def test_small_mails_signed_on_the_loop_big_ones_in_a_thread(tmp_path: Path) -> None:
    """Both ways give signatures that verify; which way is the size's and the keys' call."""
    rsa_key = keys.generate("rsa")
    signer = Signer([SigningKey(DOMAIN, "r", rsa_key)])
    assert signs_inline(signer, 5000) and not signs_inline(signer, INLINE_BYTES + 1)
    big = Signer([SigningKey(DOMAIN, "b", keys.generate("rsa", 3072))])
    assert not signs_inline(big, 5000)
    box = Mailbox(str(tmp_path) + "/", 0, with_data=False)
    async with running(SignerStage(signer), MailboxHop(box)) as svc:
        for body in ("small\r\n", ("y" * 78 + "\r\n") * 600):
            r = await send_message(*svc.sockname, f"a@{DOMAIN}", ["b@remote.test"],
                                   mail("size", body))
            assert r.data_reply is not None and r.data_reply.ok
    stored = stored_mails(tmp_path)
    assert sorted(len(m) > INLINE_BYTES for m in stored) == [False, True]
    for m in stored:
        assert dkim.DKIM(m).verify(0, dnsfunc=lookup_for(("r", rsa_key)))
