"""`poste init` writes a config `poste up` runs; SIGHUP reloads users and certificates;
config errors are one line; JSON log lines carry the queue id."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from poste.runtime.logs import JSONFormatter
from poste.stack.config import ConfigError, parse
from support.cli import run_poste
from support.net import free_port, wait_port


def test_init_writes_a_config_up_accepts(tmp_path: Path, poste_bin: str) -> None:
    d = tmp_path / "mail"
    r = subprocess.run([poste_bin, "init", str(d), "--domain", "example.test",
                        "--address", "192.0.2.7"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for rel in ("poste.toml", "tls/cert.pem", "tls/key.pem", "dkim/poste.pem", "srs-secret",
                "users/.git", "spool", "dns-records.zone"):
        assert (d / rel).exists(), rel
    assert (d / "dkim/poste.pem").stat().st_mode & 0o077 == 0
    assert (d / "srs-secret").stat().st_mode & 0o077 == 0
    out = r.stdout
    assert "example.test. 3600 IN MX 10 mail.example.test." in out
    assert "mail.example.test. 3600 IN A 192.0.2.7" in out
    assert "poste._domainkey.example.test. 3600 IN TXT" in out
    assert "_dmarc.example.test." in out and "7.2.0.192.in-addr.arpa." in out
    # the relay greets with the mail host name: its SPF lets a DSN (sent from <>) pass
    assert 'mail.example.test. 3600 IN TXT "v=spf1 a -all"' in out
    assert f"poste up --config {d}/poste.toml" in out
    # the printed DKIM record is the key's
    from poste.dkim.keys import load_key

    assert load_key(d / "dkim/poste.pem").public_b64()[:40] in out
    # `poste up --check` builds every service from it without listening
    # (in this process, through poste.cli.main; `poste up` itself runs below and in the demo)
    r = run_poste(["up", "--config", str(d / "poste.toml"), "--check"])
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    # nothing is overwritten
    r = run_poste(["init", str(d), "--domain", "example.test"])
    assert r.returncode != 0 and "exists already" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_init_bad_input(tmp_path: Path, poste_bin: str) -> None:
    for args, word in ((["--domain", "not a domain"], "--domain"),
                       (["--domain", "ok.test", "--address", "1.2.3"], "--address"),
                       (["--domain", "ok.test", "--postmaster", "nobody"], "--postmaster")):
        r = run_poste(["init", str(tmp_path / "x"), *args])  # poste.cli.main in this process
        assert r.returncode != 0 and word in r.stderr and "Traceback" not in r.stderr


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    cases = [
        ({"verfier": {}}, "unknown section [verfier]"),
        ({"relay": {"spool": 3}}, "[relay] `spool`: expected a path"),
        ({"relay": {"retry-min": "soon"}}, "not a duration"),
        ({"log-format": "xml"}, "log-format"),
        ({"signer": {"selector": ["a", "b"], "private-key": ["k"]}}, "one selector per key"),
        ({"submission": {"listen_tls": 465}}, "expected a string"),
    ]
    for data, word in cases:
        with pytest.raises(ConfigError) as exc:
            parse(data, tmp_path / "poste.toml")
        assert word in str(exc.value) and "\n" not in str(exc.value)


def test_config_defaults_and_paths(tmp_path: Path) -> None:
    cfg = parse({"domain": ["a.test", "b.test"], "users": "users", "tls-cert": "c.pem",
                 "relay": {"spool": "sp", "retry_min": "5m"}, "signer": {"selector": "s",
                 "private-key": "k.pem"}}, tmp_path / "poste.toml")
    assert cfg["relay"].get("domain") == ["a.test", "b.test"]
    assert cfg["signer"].get("domain") == "a.test"  # one domain signs
    assert cfg["relay"].get("users") == str(tmp_path / "users")
    assert cfg["submission"].get("tls-cert") == str(tmp_path / "c.pem")
    assert cfg["relay"].get("retry-min") == 300.0
    assert cfg["signer"].get("private-key") == [str(tmp_path / "k.pem")]
    assert "users" not in cfg["verifier"].values  # not a verifier flag


def test_json_log_line() -> None:
    rec = logging.LogRecord("poste.smtp", logging.INFO, __file__, 1,
                            "%s %s from=<%s> to=%s size=%d: %s", (
                                "1A209E6FC3BA47298", "relay", "a@b.test", "<c@d.test>,<e@f.test>",
                                120, "250 2.0.0 Ok: queued as 1A209E6FC3BA47298"), None)
    obj = json.loads(JSONFormatter().format(rec))
    assert obj["queue_id"] == "1A209E6FC3BA47298" and obj["service"] == "relay"
    assert obj["from"] == "a@b.test" and obj["to"] == ["c@d.test", "e@f.test"]
    assert obj["size"] == 120 and obj["code"] == 250 and obj["level"] == "info"


def _served_cert(host: str, port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=10) as s, \
            ctx.wrap_socket(s, server_hostname=host) as t:
        der = t.getpeercert(binary_form=True)
    assert der
    return hashlib.sha256(der).digest()


def _auth(poste_bin: str, host: str, port: int, user: str, pw: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", host, "--port", str(port), "--tls", "--auth", "LOGIN",
         "--auth-user", user, "--auth-password", pw, "--quit-after", "AUTH", "--timeout", "20"],
        capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_sighup_reloads_users_and_certificate(tmp_path: Path, poste_bin: str) -> None:
    d = tmp_path / "mail"
    made = run_poste(["init", str(d), "--domain", "example.test"])  # in this process
    assert made.returncode == 0, made.stderr
    host = "127.0.0.1"
    pv, ps, pt, pm = (free_port(host) for _ in range(4))
    text = (d / "poste.toml").read_text()
    text = text.replace('listen = "0.0.0.0:25"', f'listen = "{host}:{pv}"')
    text = text.replace('listen-tls = "0.0.0.0:465"', f'listen-tls = "{host}:{pt}"')
    text = text.replace('listen = "0.0.0.0:587"', f'listen = "{host}:{ps}"')
    text = text.replace("[relay]", '[relay]\nusers-poll = "1h"')  # only SIGHUP reloads
    text = text.replace('# metrics = "127.0.0.1:9325"', f'metrics = "{host}:{pm}"')
    (d / "poste.toml").write_text(text)
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen([poste_bin, "up", "--config", str(d / "poste.toml")],
                            stdout=log, stderr=log)
    try:
        for p in (pv, ps, pt, pm):
            wait_port(host, p, timeout=30)
        before = _served_cert(host, pt)
        assert "535" in _auth(poste_bin, host, ps, "alice@example.test", "pw-1").stdout
        added = run_poste(["users", "add", "alice", "--repo", str(d / "users"),
                           "--target", "alice@elsewhere.test", "--password-stdin"],
                          input="pw-1\n")
        assert added.returncode == 0, added.stderr
        from poste.smtp.tls import self_signed

        (d / "tls/cert.pem").unlink()
        (d / "tls/key.pem").unlink()
        self_signed(d / "tls/cert.pem", d / "tls/key.pem", "mail.example.test")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reload: certificate" not in (tmp_path / "up.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.1)
        r = _auth(poste_bin, host, ps, "alice@example.test", "pw-1")
        assert "235 " in r.stdout, r.stdout + (tmp_path / "up.log").read_text()
        assert _served_cert(host, pt) != before
        assert proc.poll() is None
        logtext = (tmp_path / "up.log").read_text()
        assert re.search(r"reload: users reloaded", logtext)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        log.close()
