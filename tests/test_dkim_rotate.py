"""`poste dkim rotate` against knot with TSIG, and a running `poste signer --key-dir`:
the new selectors are published, mail signed before and after the switch verifies
with opendkim-testmsg, and the old records disappear after the grace."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from support import opendkim
from support.dkimkit import DOMAIN, mail, wait_file
from support.knot import knot_server, simple_zone
from support.service import started

pytestmark = pytest.mark.skipif(not opendkim.available(), reason="opendkim-testmsg missing")


def served(host: str, selector: str) -> bool:
    q = dns.message.make_query(f"{selector}._domainkey.{DOMAIN}.", "TXT")
    return bool(dns.query.udp(q, host, port=53, timeout=3).answer)


def wait_log(log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def selectors_of(message: bytes) -> list[str]:
    return re.findall(rb"\bs=([a-z0-9-]+);", message.replace(b"\r\n\t", b"").replace(
        b"\r\n ", b""))  # type: ignore[return-value]


def test_rotate_publishes_switches_and_withdraws(tmp_path: Path, poste_bin: str) -> None:
    secret = base64.b64encode(os.urandom(32)).decode()
    tsig = f"update.{DOMAIN}:hmac-sha256:{secret}"
    keys, box = tmp_path / "keys", tmp_path / "box"
    ns_host = opendkim.port53_host()
    with knot_server(tmp_path / "knot", {DOMAIN: simple_zone(DOMAIN)}, host=ns_host, port=53,
                     tsig=(f"update.{DOMAIN}", "hmac-sha256", secret)) as ns:
        dns_flags = ["--dns-server", ns.nameserver, "--dns-key", tsig]

        def rotate() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [poste_bin, "dkim", "rotate", "--key-dir", str(keys), "--domain", DOMAIN,
                 "--algorithm", "rsa", "--algorithm", "ed25519", "--ttl", "1", *dns_flags],
                capture_output=True, text=True, timeout=60)

        first = rotate()  # the first key of each series signs at once
        assert first.returncode == 0, first.stderr
        assert f"published: rsa-1._domainkey.{DOMAIN}. TXT (signing now)" in first.stdout
        assert served(ns_host, "rsa-1") and served(ns_host, "ed-1")
        assert oct((keys / "rsa-1.pem").stat().st_mode & 0o777) == "0o600"

        signer_log = tmp_path / "signer.log"

        def signer(srv_port: int, grace: str, log: Path) -> Any:
            return started([poste_bin, "signer", "--domain", DOMAIN, "--key-dir", str(keys),
                            *dns_flags, "--rotation-grace", grace, "--rotation-check", "200ms",
                            "--destination", f"127.0.0.1:{srv_port}", "--listen", "127.0.0.1:0"],
                           log)

        with (
            started([poste_bin, "srv", "127.0.0.1:0", "-o", f"{box}/", "--count", "0"],
                    tmp_path / "srv.log") as (_, [srv_port]),
            signer(srv_port, "1h", signer_log) as (_, [signer_port]),
        ):
            def send(subject: str, n: int) -> bytes:
                src = tmp_path / f"{n}.eml"
                src.write_bytes(mail(subject))
                r = subprocess.run([poste_bin, "send", str(src), f"127.0.0.1:{signer_port}",
                                    "-s", f"alice@{DOMAIN}", "-r", "bob@remote.test"],
                                   capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stderr
                return wait_file(box / f"{n}.eml")

            before = send("before", 1)
            assert sorted(selectors_of(before)) == [b"ed-1", b"rsa-1"]

            second = rotate()
            assert second.returncode == 0, second.stderr
            assert "rsa-2._domainkey" in second.stdout and "pending" in second.stdout
            assert served(ns_host, "rsa-2") and served(ns_host, "ed-2")
            wait_log(signer_log, "dkim: signing with rsa-2")
            wait_log(signer_log, "dkim: signing with ed-2")

            after = send("after", 2)
            assert sorted(selectors_of(after)) == [b"ed-2", b"rsa-2"]
            odk = tmp_path / "odk"
            for message in (before, after):  # the old records are still there
                ok = opendkim.testmsg(message, ns_host, odk)
                assert ok.returncode == 0 and not ok.stderr, ok.stderr

            assert "retired from signing" in signer_log.read_text()
            assert "withdrew" not in signer_log.read_text()  # an hour of grace
            assert "Traceback" not in signer_log.read_text()

        # the grace over (a signer started with none left): the old records go
        later_log = tmp_path / "signer2.log"
        with signer(9, "0s", later_log):
            wait_log(later_log, f"dkim: withdrew rsa-1._domainkey.{DOMAIN}")
            wait_log(later_log, f"dkim: withdrew ed-1._domainkey.{DOMAIN}")
        assert not served(ns_host, "rsa-1") and not served(ns_host, "ed-1")
        assert served(ns_host, "rsa-2") and served(ns_host, "ed-2")
        assert not (keys / "rsa-1.pem").exists()
        ok = opendkim.testmsg(after, ns_host, odk)
        assert ok.returncode == 0 and not ok.stderr, ok.stderr
        assert opendkim.testmsg(before, ns_host, odk).returncode != 0  # its key is gone

        status = subprocess.run([poste_bin, "dkim", "rotate", "--key-dir", str(keys),
                                 "--domain", DOMAIN, "--status"],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        states = {line.split()[0]: line.split()[2] for line in status.stdout.splitlines()}
        assert states == {"rsa-1": "withdrawn", "rsa-2": "active",
                          "ed-1": "withdrawn", "ed-2": "active"}, status.stdout


def test_rotate_errors_are_one_line(tmp_path: Path, poste_bin: str) -> None:
    secret = base64.b64encode(os.urandom(32)).decode()
    keys = tmp_path / "keys"
    with knot_server(tmp_path / "knot", {DOMAIN: simple_zone(DOMAIN)},
                     tsig=(f"update.{DOMAIN}", "hmac-sha256", secret)) as ns:
        wrong = f"update.{DOMAIN}:hmac-sha256:" + base64.b64encode(b"y" * 32).decode()
        r = subprocess.run([poste_bin, "dkim", "rotate", "--key-dir", str(keys), "--domain",
                            DOMAIN, "--dns-server", ns.nameserver, "--dns-key", wrong],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("Error: cannot publish rsa-1: ") and "TSIG" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not list(keys.glob("*.pem"))  # nothing kept that is not published
    r = subprocess.run([poste_bin, "signer", "--domain", DOMAIN, "--key-dir", str(keys),
                        "--destination", "127.0.0.1:9", "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no active key in" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_rotation_in_poste_up(tmp_path: Path, poste_bin: str) -> None:
    """The same in one process: a `poste init` folder whose [signer] takes key-dir; mail
    submitted on 587 leaves signed with rsa-1, then, after `poste dkim rotate --config`,
    with rsa-2, both verified by opendkim-testmsg."""
    secret = base64.b64encode(os.urandom(32)).decode()
    ns_host = opendkim.port53_host()
    with knot_server(tmp_path / "knot", {DOMAIN: simple_zone(DOMAIN)}, host=ns_host, port=53,
                     tsig=(f"update.{DOMAIN}", "hmac-sha256", secret)) as ns:
        stack = tmp_path / "stack"
        done = subprocess.run([poste_bin, "init", str(stack), "--domain", DOMAIN],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        done = subprocess.run([poste_bin, "users", "add", "alice", "--repo", str(stack / "users"),
                               "--target", "alice@remote.test", "--password-stdin"],
                              input="pw-of-alice\n", capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        toml = stack / "poste.toml"
        text = toml.read_text()
        text = text.replace('selector = ["poste"]\nprivate-key = ["dkim/poste.pem"]\n',
                            'key-dir = "dkim/rotated"\nrotation-grace = "1h"\n'
                            'rotation-check = "200ms"\n'
                            f'dns-server = "{ns.nameserver}"\n'
                            f'dns-key = "update.{DOMAIN}:hmac-sha256:{secret}"\n')
        text = text.replace('listen = "0.0.0.0:25"', 'listen = "127.0.0.1:0"')
        text = text.replace('listen-tls = "0.0.0.0:465"\nlisten = "0.0.0.0:587"',
                            'listen = "127.0.0.1:0"')
        text = text.replace('spool = "spool"', 'spool = "spool"\nmailbox = "outbox"')
        toml.write_text(text)

        def rotate() -> str:
            r = subprocess.run([poste_bin, "dkim", "rotate", "--config", str(toml), "--ttl", "1"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            return r.stdout

        assert "rsa-1._domainkey" in rotate()
        log = tmp_path / "up.log"
        with started([poste_bin, "up", "--config", str(toml)], log, listeners=2) as (_, ports):
            sub_port = int(re.findall(r"submission listening on 127\.0\.0\.1:(\d+)",
                                      log.read_text())[0])
            assert sub_port in ports

            def submit(subject: str, n: int) -> bytes:
                r = subprocess.run(
                    ["swaks", "--server", f"127.0.0.1:{sub_port}", "--tls", "--auth", "PLAIN",
                     "--auth-user", f"alice@{DOMAIN}", "--auth-password", "pw-of-alice",
                     "--from", f"alice@{DOMAIN}", "--to", "bob@remote.test",
                     "--data", "-", "--hide-all"],
                    input=mail(subject).decode(), capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stdout + r.stderr
                return wait_file(stack / "outbox" / f"{n}.eml")

            before = submit("before", 1)
            assert selectors_of(before) == [b"rsa-1"]
            assert "pending" in rotate()
            wait_log(log, "dkim: signing with rsa-2")
            after = submit("after", 2)
            assert selectors_of(after) == [b"rsa-2"]
            odk = tmp_path / "odk"
            for message in (before, after):
                ok = opendkim.testmsg(message, ns_host, odk)
                assert ok.returncode == 0 and not ok.stderr, ok.stderr


def test_rotate_every_starts_a_rotation(tmp_path: Path, poste_bin: str) -> None:
    """With rotate-every, the signer publishes the next selector itself once the active key
    is that old, and waits for it like for one `poste dkim rotate` made."""
    secret = base64.b64encode(os.urandom(32)).decode()
    tsig = f"update.{DOMAIN}:hmac-sha256:{secret}"
    keys = tmp_path / "keys"
    ns_host = opendkim.port53_host()
    with knot_server(tmp_path / "knot", {DOMAIN: simple_zone(DOMAIN)}, host=ns_host, port=53,
                     tsig=(f"update.{DOMAIN}", "hmac-sha256", secret)) as ns:
        dns_flags = ["--dns-server", ns.nameserver, "--dns-key", tsig]
        r = subprocess.run([poste_bin, "dkim", "rotate", "--key-dir", str(keys), "--domain",
                            DOMAIN, "--algorithm", "ed25519", *dns_flags],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        log = tmp_path / "signer.log"
        with started([poste_bin, "signer", "--domain", DOMAIN, "--key-dir", str(keys),
                      *dns_flags, "--rotate-every", "1s", "--rotation-check", "200ms",
                      "--destination", "127.0.0.1:9", "--listen", "127.0.0.1:0"], log):
            wait_log(log, f"dkim: published ed-2._domainkey.{DOMAIN} (pending")
        assert served(ns_host, "ed-2")
        status = subprocess.run([poste_bin, "dkim", "rotate", "--key-dir", str(keys),
                                 "--domain", DOMAIN, "--status"],
                                capture_output=True, text=True, timeout=60)
        assert [line.split()[:3] for line in status.stdout.splitlines()] == [
            ["ed-1", "ed25519", "active"], ["ed-2", "ed25519", "pending"]], status.stdout
