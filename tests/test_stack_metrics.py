"""`poste up` is built from the services' own builders: each series moves once per
event (nothing meters a service from outside), the relay's spool, SRS database and
loop detection are the relay's, and the verifier's `psl`/`dns-timeout` keys are its flags."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from poste.services.submission.service import SubmissionStage
from poste.smtp.client import send_message
from poste.stack.build import Stack, build
from poste.stack.config import ConfigError, load
from poste.stack.init import Layout, write_stack
from support.fakedns import fake_dns, records_lookup

SENDER_IP = "127.0.0.1"


@pytest.fixture
def nameserver() -> Iterator[str]:
    records = {"sender.test": [("TXT", f"v=spf1 ip4:{SENDER_IP} -all")]}
    with fake_dns(records_lookup(records)) as ns:  # type: ignore[arg-type]
        yield ns.nameserver


def _folder(tmp_path: Path, nameserver: str) -> Path:
    """The config folder; every listener on port 0 (see _port for the verifier's)."""
    from poste.users.repo import User, user_to_json
    from poste.users.store import commit_file

    d = tmp_path / "mail"
    write_stack(d, Layout(
        domain="our.test", hostname="mail.our.test", postmaster="admin@elsewhere.test",
        mailbox="box", verifier_listen="127.0.0.1:0",
        submission_listen_tls="127.0.0.1:0", submission_listen="127.0.0.1:0",
        nameservers=[nameserver], dns_timeout=2.0,
    ))
    alice = User(local="alice", domain="our.test", targets=["alice@far.test"], password=None)
    commit_file(d / "users", "alice", user_to_json(alice), "alice")
    (d / "box").mkdir()
    return d


def _port(stack: Stack) -> int:
    """The port the running verifier got (it listens on port 0)."""
    return next(s.sockname[1] for s in stack.services if s.stage.name == "verifier")


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _sum(name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for fam in REGISTRY.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


SERIES = {
    "spf": lambda: _sum("poste_auth_results_total", method="spf"),
    "spf pass": lambda: _value("poste_auth_results_total", method="spf", result="pass"),
    "dkim": lambda: _sum("poste_auth_results_total", method="dkim"),
    "dmarc": lambda: _sum("poste_auth_results_total", method="dmarc"),
    "verifier accepted": lambda: _value("poste_mails_total", service="verifier",
                                        result="accepted"),
    "spamfilter accepted": lambda: _value("poste_mails_total", service="spamfilter",
                                          result="accepted"),
    "relay accepted": lambda: _value("poste_mails_total", service="relay", result="accepted"),
    "spam labels": lambda: _sum("poste_spam_labels_total"),
    "queued": lambda: _value("poste_queued_total"),
    "delivered": lambda: _value("poste_deliveries_total", result="delivered"),
    "deliveries": lambda: _sum("poste_deliveries_total"),
}


async def _wait(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(300):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_one_mail_through_poste_up_moves_each_counter_once(
    tmp_path: Path, nameserver: str
) -> None:
    d = _folder(tmp_path, nameserver)
    stack = build(load(d / "poste.toml"))
    await stack.start()
    port = _port(stack)
    try:
        before = {k: f() for k, f in SERIES.items()}
        msg = b"From: <someone@sender.test>\r\nTo: alice@our.test\r\nSubject: t\r\n\r\nhi\r\n"
        result = await send_message("127.0.0.1", port, "someone@sender.test",
                                    ["alice@our.test"], msg, helo="client.sender.test",
                                    starttls=False)
        assert result.data_reply is not None and result.data_reply.code == 250, result
        await _wait(lambda: SERIES["deliveries"]() > before["deliveries"], "the delivery")
        await _wait(lambda: list((d / "box").glob("*.eml")), "the mailbox file")
        stored = next((d / "box").glob("*.eml")).read_bytes()
        assert b"spf=pass smtp.mailfrom=someone@sender.test" in stored
        assert b"X-Spamtacus: " in stored
        after = {k: f() for k, f in SERIES.items()}
        moved = {k: after[k] - before[k] for k in SERIES}
        assert moved == dict.fromkeys(SERIES, 1.0), moved
        # the queue gauges are the relay's own (read from the spool at scrape time)
        assert REGISTRY.get_sample_value("poste_spool_messages") is not None
        assert REGISTRY.get_sample_value("poste_spool_oldest_age_seconds") is not None
    finally:
        await stack.stop()


def _stage_of(stack: Stack, name: str) -> object:
    return next(s.stage for s in stack.services if s.stage.name == name)


def test_up_is_built_by_the_services_builders(tmp_path: Path, nameserver: str) -> None:
    d = _folder(tmp_path, nameserver)
    text = (d / "poste.toml").read_text()
    (d / "poste.toml").write_text(text.replace("[relay]", "[relay]\nself-address = ['x']"))
    with pytest.raises(ConfigError, match=r"^\[relay\] self-address: 'x' is not an IP address"):
        build(load(d / "poste.toml"))
    (d / "poste.toml").write_text(text.replace("[relay]", "[relay]\nself-address = ['192.0.2.9']"))
    stack = build(load(d / "poste.toml"))
    try:
        # one users watcher for relay and submission
        sub = _stage_of(stack, "submission")
        assert isinstance(sub, SubmissionStage)
        assert sub.watcher is stack.relay.watcher
        # the verifier's listen address is ours: an MX resolving to it is a loop
        assert stack.relay.deliverer.is_self("127.0.0.1")
        assert not stack.relay.deliverer.is_self("127.0.0.2")
        assert stack.relay.deliverer.is_self("192.0.2.9")  # [relay] self-address, as the flag
        # the relay owns the spool: a second stack on it is refused, `--check` is not
        with pytest.raises(ConfigError, match=r"^\[relay\] .*in use by another relay"):
            build(load(d / "poste.toml"))
        build(load(d / "poste.toml"), check=True)
        assert (d / "spool" / "srs-db").is_dir()
    finally:
        stack.relay.spool.unlock()
    # a build that fails after the relay was made leaves the spool free
    text = (d / "poste.toml").read_text()
    (d / "poste.toml").write_text(text.replace("[verifier]", "[verifier]\nnameserver = ['x']"))
    with pytest.raises(ConfigError, match=r"^\[verifier\] nameserver: "):
        build(load(d / "poste.toml"))
    (d / "poste.toml").write_text(text)
    build(load(d / "poste.toml")).relay.spool.unlock()


async def test_long_sender_gets_the_srs_database_form(tmp_path: Path, nameserver: str) -> None:
    """The relay's SRS token database is used by `poste up` too (it was not before)."""
    d = _folder(tmp_path, nameserver)
    stack = build(load(d / "poste.toml"))
    await stack.start()
    port = _port(stack)
    try:
        sender = "a.very.long.local.part.of.a.sender.address.that.keeps.going@sender.test"
        msg = b"From: <x@sender.test>\r\nSubject: t\r\n\r\nhi\r\n"
        result = await send_message("127.0.0.1", port, sender, ["alice@our.test"], msg,
                                    helo="client.sender.test", starttls=False)
        assert result.data_reply is not None and result.data_reply.code == 250, result
        await _wait(lambda: list((d / "box").glob("*.eml")), "the mailbox file")
        stored = next((d / "box").glob("*.eml")).read_bytes()
        return_path = stored.split(b"\r\n", 1)[0].decode()
        local = return_path.removeprefix("Return-Path: <").partition("@")[0]
        assert local.startswith("SRS0=") and len(local) <= 64, return_path
        tokens = [p for p in (d / "spool" / "srs-db").iterdir() if not p.name.startswith(".")]
        assert [t.read_text() for t in tokens] == [sender]
    finally:
        await stack.stop()


@pytest.mark.parametrize(
    ("key", "needle"),
    [
        ('psl = "missing.dat"', r"^\[verifier\] psl: cannot read"),
        ('psl = "tls/cert.pem"', r"^\[verifier\] psl: .*does not look like public_suffix"),
        ("dns-timeout = 0", r"^\[verifier\] dns-timeout: must be positive"),
    ],
)
def test_verifier_keys_are_its_flags(
    tmp_path: Path, nameserver: str, key: str, needle: str
) -> None:
    d = _folder(tmp_path, nameserver)
    text = (d / "poste.toml").read_text().replace("dns-timeout = 2.0\n", "")
    (d / "poste.toml").write_text(text.replace("[verifier]", f"[verifier]\n{key}"))
    with pytest.raises(ConfigError, match=needle) as exc:
        build(load(d / "poste.toml"))
    assert "\n" not in str(exc.value)


def test_verifier_psl_key_is_used(tmp_path: Path, nameserver: str) -> None:
    d = _folder(tmp_path, nameserver)
    (d / "psl.dat").write_text("// ===BEGIN ICANN DOMAINS===\ntest\nsender.test\n"
                               "// ===END ICANN DOMAINS===\n")
    text = (d / "poste.toml").read_text()
    (d / "poste.toml").write_text(text.replace("[verifier]", '[verifier]\npsl = "psl.dat"'))
    from poste.services.verifier.dmarc import org_domain
    from poste.services.verifier.service import VerifierStage

    stack = build(load(d / "poste.toml"))
    try:
        stage = _stage_of(stack, "verifier")
        assert isinstance(stage, VerifierStage)
        # with this list sender.test is a public suffix: its organisation is one label down
        assert org_domain("mx.a.sender.test", stage.auth.psl) == "a.sender.test"
        assert org_domain("mx.a.sender.test") == "sender.test"
    finally:
        stack.relay.spool.unlock()
