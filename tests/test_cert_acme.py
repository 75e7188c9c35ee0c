"""ACME certificates by DNS-01 against pebble (Let's Encrypt's test CA) and knot with TSIG.

What an admin checks: `poste cert issue` gets a certificate that verifies against
the CA's root, `poste up` serves it on 25, 465 and 587 (openssl s_client and swaks
verify it), a forced renewal is served under a session that is already open,
and every failure is one line that leaves the certificate in place.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import smtplib
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.acme_world import (
    MX,
    PASSWORD,
    SUBMISSION,
    USER,
    AcmeWorld,
    HoldAtStartTLS,
    s_client,
    served_serial,
)
from support.service import listening_ports, stop


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, poste_bin: str) -> Iterator[AcmeWorld]:
    w = AcmeWorld.start(tmp_path_factory.mktemp("acme"), poste_bin)
    yield w
    w.stop()


def serial_of(path: Path) -> int:
    from cryptography import x509

    return int(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


def verify_chain(world: AcmeWorld, cert: Path) -> None:
    """openssl verify: the leaf, with the chain pebble sent, up to pebble's root."""
    pems = re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?",
                      cert.read_bytes(), re.S)
    leaf, chain = cert.with_suffix(".leaf"), cert.with_suffix(".chain")
    leaf.write_bytes(pems[0])
    chain.write_bytes(b"".join(pems[1:]))
    done = subprocess.run(["openssl", "verify", "-CAfile", world.root, "-untrusted", str(chain),
                           str(leaf)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_issue_show_renew(world: AcmeWorld, tmp_path: Path) -> None:
    state = tmp_path / "state"
    flags = world.flags(state, names=(MX, SUBMISSION))
    done = world.poste("cert", "issue", *flags)
    assert done.returncode == 0, done.stderr
    assert f"issued: {MX}, {SUBMISSION}, valid until" in done.stdout
    verify_chain(world, state / "cert.pem")
    # readable by the user poste runs as, nobody else
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "account.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "cert.pem").stat().st_mode) == 0o640

    shown = world.poste("cert", "show", *flags)
    assert shown.returncode == 0, shown.stderr
    assert f"names:       {MX}, {SUBMISSION}\n" in shown.stdout
    assert "Pebble Intermediate" in shown.stdout

    first = serial_of(state / "cert.pem")
    done = world.poste("cert", "renew", *flags)
    assert done.returncode == 0 and done.stdout.startswith("not due: "), done.stdout + done.stderr
    assert serial_of(state / "cert.pem") == first
    done = world.poste("cert", "renew", "--force", *flags)
    assert done.returncode == 0, done.stderr
    assert serial_of(state / "cert.pem") != first
    # a name added to the config is due at once
    done = world.poste("cert", "renew", *world.flags(state, names=(MX, SUBMISSION, "mx2.acme.test")))
    assert done.returncode == 0 and done.stdout.startswith("issued: "), done.stdout + done.stderr


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


def test_failures_are_one_line_and_keep_the_certificate(world: AcmeWorld, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert world.poste("cert", "issue", *world.flags(state)).returncode == 0
    good = (state / "cert.pem").read_bytes(), (state / "key.pem").read_bytes()

    line = one_line_error(world.poste(
        "cert", "renew", "--force", *world.flags(state, directory="https://127.0.0.1:1/dir")))
    assert "ACME server https://127.0.0.1:1/dir unreachable: Connection refused" in line
    assert "kept the certificate valid until" in line

    import base64

    wrong = "update.acme.test:hmac-sha256:" + base64.b64encode(b"x" * 32).decode()
    line = one_line_error(world.poste("cert", "renew", "--force", *world.flags(state, tsig=wrong)))
    assert "cannot publish the DNS-01 challenge" in line and "rejected our TSIG key" in line

    # a name outside the primary's zones
    line = one_line_error(world.poste(
        "cert", "renew", "--force", *world.flags(state, names=("mail.elsewhere.test",))))
    assert "mail.elsewhere.test" in line and "not authoritative" in line, line
    assert ((state / "cert.pem").read_bytes(), (state / "key.pem").read_bytes()) == good

    line = one_line_error(world.poste("cert", "show", *world.flags(tmp_path / "none")))
    assert "no certificate in" in line
    shown = world.poste("cert", "show", "--acme-state", str(state))  # the folder is enough
    assert shown.returncode == 0 and f"names:       {MX}\n" in shown.stdout, shown.stderr

    bad = world.poste("cert", "issue", "--acme-directory", "https://x/dir")
    assert bad.returncode == 2 and "--acme-directory needs --acme-state" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_refused_challenge(world: AcmeWorld, tmp_path: Path) -> None:
    """The primary takes the record but the CA looks elsewhere (a second server, empty)."""
    from support.knot import KnotServer, simple_zone
    from support.pebble import PebbleServer

    blind = KnotServer(tmp_path / "blind", {"acme.test": simple_zone("acme.test")})
    blind.start()
    ca = PebbleServer(tmp_path / "pebble", dns=blind.nameserver)
    try:
        ca.start()
        assert world.knot is not None
        args = ["--acme-directory", ca.directory, "--acme-ca", ca.https_ca,
                "--acme-state", str(tmp_path / "state"), "--acme-dns-server",
                world.knot.nameserver, "--acme-dns-key", world.tsig, "--acme-name", MX]
        line = one_line_error(world.poste("cert", "issue", *args))
    finally:
        ca.stop()
        blind.stop()
    assert f"the CA refused the DNS-01 challenge: {MX}: " in line, line
    assert not (tmp_path / "state" / "cert.pem").exists()


def ports_of(log: Path, proc: subprocess.Popen[bytes]) -> dict[str, int]:
    listening_ports(log, "127.0.0.1", 3, proc, timeout=90)
    text = log.read_text()
    return {
        "25": int(re.search(r"verifier listening on 127\.0\.0\.1:(\d+)", text).group(1)),  # type: ignore[union-attr]
        "465": int(re.search(r"submission listening on 127\.0\.0\.1:(\d+) \(implicit TLS\)",  # type: ignore[union-attr]
                             text).group(1)),
        "587": int(re.search(r"submission listening on 127\.0\.0\.1:(\d+)$", text, re.M).group(1)),  # type: ignore[union-attr]
    }


def wait_log(log: Path, text: str, count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def swaks(port: int, root: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--tls-verify", "--tls-ca-path", root,
         "--hide-all", *extra], capture_output=True, text=True, timeout=60)


def submit_args() -> list[str]:
    return ["--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
            "--from", USER, "--to", "friend@example.org"]


def test_up_serves_and_renews_under_a_session(world: AcmeWorld) -> None:
    log = world.tmp / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([world.poste_bin, "up", "--config", world.config],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        ports = ports_of(log, proc)  # obtained before listening: there was none
        assert "cert: obtained a certificate for mail.acme.test, smtp.acme.test" in log.read_text()
        cert = world.state / "cert.pem"
        first = serial_of(cert)

        s_client(ports["25"], world.root, starttls=True)
        s_client(ports["465"], world.root, starttls=False, name=SUBMISSION)
        s_client(ports["587"], world.root, starttls=True, name=SUBMISSION)
        done = swaks(ports["25"], world.root, "--tls", "--from", "a@example.org", "--to", USER)
        assert done.returncode == 0, done.stdout + done.stderr
        done = swaks(ports["465"], world.root, "--tls-on-connect", *submit_args())
        assert done.returncode == 0, done.stdout + done.stderr
        done = swaks(ports["587"], world.root, "--tls", *submit_args())
        assert done.returncode == 0, done.stdout + done.stderr

        # Two sessions open across a forced renewal: one already under TLS (465), one
        # greeted and before its STARTTLS (swaks on 587 through a relay that holds it).
        ctx = ssl.create_default_context(cafile=world.root)
        ctx.check_hostname = False
        open_tls = smtplib.SMTP_SSL("127.0.0.1", ports["465"], context=ctx, timeout=30)
        open_tls.ehlo("client.example.org")
        hold = HoldAtStartTLS(ports["587"])
        held = subprocess.Popen(
            ["swaks", "--server", f"127.0.0.1:{hold.port}", "--tls", "--tls-verify",
             "--tls-ca-path", world.root, "--tls-get-peer-cert", str(world.tmp / "peer.pem"),
             *submit_args()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert hold.held.wait(30), "swaks did not reach STARTTLS"
            done = world.poste("cert", "renew", "--force", "--config", world.config)
            assert done.returncode == 0, done.stderr
            second = serial_of(cert)
            assert second != first
            os.kill(proc.pid, signal.SIGHUP)
            wait_log(log, "cert: serving", count=2)  # at start, and now
            hold.release()
            out, _ = held.communicate(timeout=60)
            assert held.returncode == 0, out
        finally:
            if held.poll() is None:
                held.kill()
                held.wait()
            hold.close()
        assert serial_of(world.tmp / "peer.pem") == second  # its STARTTLS came after the swap
        # the session opened before the swap goes on, on the certificate it began with
        assert open_tls.login(USER, PASSWORD)[0] == 235
        assert open_tls.sendmail(USER, ["friend@example.org"], (
            f"From: <{USER}>\r\nTo: <friend@example.org>\r\nSubject: across the renewal\r\n"
            "\r\nhi\r\n").encode()) == {}
        peer = open_tls.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        open_tls.quit()
        from cryptography import x509

        assert peer is not None and x509.load_der_x509_certificate(peer).serial_number == first
        for port, implicit in (("25", False), ("465", True), ("587", False)):
            assert served_serial(ports[port], world.root, implicit=implicit) == second
        # every mail of every session got through: 1 on 25, 2 submitted by swaks, the held
        # swaks one, the one sent across the renewal
        outbox = world.stack / "outbox"
        deadline = time.monotonic() + 60
        while len(list(outbox.glob("*.eml"))) < 5:
            assert time.monotonic() < deadline, sorted(outbox.glob("*"))
            time.sleep(0.05)
        assert proc.poll() is None
        assert "Traceback" not in log.read_text()
    finally:
        stop(proc)


def own_pair(state: Path, began: float, ends: float) -> None:
    """A certificate for MX valid from `began` days ago to `ends` days from now (negative:
    expired), as a stack left off for a while holds."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MX)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=began))
            .not_valid_after(now + datetime.timedelta(days=ends))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(MX)]), critical=False)
            .sign(key, hashes.SHA256()))
    state.mkdir(mode=0o700, parents=True)
    (state / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (state / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_expired_certificate_and_unreachable_ca_keep_serving(
    world: AcmeWorld, tmp_path: Path, poste_bin: str
) -> None:
    """A verifier whose certificate expired and whose CA is down: it says so in one line and
    goes on serving the certificate it has (a sender doing opportunistic TLS still gets TLS)."""
    state = tmp_path / "state"
    own_pair(state, began=90, ends=-1)
    log = tmp_path / "verifier.log"
    args = [poste_bin, "verifier", "--domain", "acme.test", "--listen", "127.0.0.1:0",
            "--destination", "127.0.0.1:9", "--hostname", MX,
            *world.flags(state, directory="https://127.0.0.1:1/dir")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        (port,) = listening_ports(log, "127.0.0.1", 1, proc)
        wait_log(log, "cert: renewal failed")
        text = log.read_text()
        assert f"cert: the certificate for {MX} expired at" in text
        failed = [line for line in text.splitlines() if "cert: renewal failed" in line]
        assert "still serving the certificate valid until" in failed[0]
        assert "ACME server https://127.0.0.1:1/dir unreachable: Connection refused" in failed[0]
        assert served_serial_unverified(port) == serial_of(state / "cert.pem")
        assert proc.poll() is None
    finally:
        stop(proc)


def served_serial_unverified(port: int) -> int:
    from cryptography import x509

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.starttls(context=ctx)
        der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_verifier_renews_by_itself_past_two_thirds(
    world: AcmeWorld, tmp_path: Path, poste_bin: str
) -> None:
    """A lone `poste verifier` whose certificate is 70 days into 90 renews it without being
    asked, serves the new one, and /metrics says when that one expires."""
    import urllib.request

    from support.net import free_port

    state = tmp_path / "state"
    own_pair(state, began=70, ends=20)
    metrics = f"127.0.0.1:{free_port()}"
    log = tmp_path / "verifier.log"
    args = [poste_bin, "verifier", "--domain", "acme.test", "--listen", "127.0.0.1:0",
            "--destination", "127.0.0.1:9", "--hostname", MX, "--metrics", metrics,
            *world.flags(state)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        (port,) = listening_ports(log, "127.0.0.1", 1, proc)
        wait_log(log, "cert: serving", count=2)  # its own, then pebble's
        assert "two thirds of its lifetime passed" in log.read_text()
        assert "Pebble Intermediate" in world.poste("cert", "show", *world.flags(state)).stdout
        s_client(port, world.root, starttls=True)
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        m = re.search(r'^poste_certificate_expires_in_seconds\{name="mail\.acme\.test"\} (\S+)$',
                      text, re.M)
        assert m, text
        info = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in",
                               str(state / "cert.pem")], capture_output=True, text=True).stdout
        end = datetime.datetime.strptime(info.strip().split("=", 1)[1], "%b %d %H:%M:%S %Y %Z")
        left = (end.replace(tzinfo=datetime.UTC) - datetime.datetime.now(datetime.UTC))
        assert abs(float(m.group(1)) - left.total_seconds()) < 3600
    finally:
        stop(proc)


def test_a_ca_that_forgot_the_account(world: AcmeWorld, tmp_path: Path) -> None:
    """pebble keeps accounts in memory: restarted, it no longer knows ours; poste registers
    again instead of failing every renewal from then on."""
    from support.pebble import PebbleServer

    assert world.knot is not None
    ca = PebbleServer(tmp_path / "pebble", dns=world.knot.nameserver)
    ca.start()
    try:
        args = ["--acme-directory", ca.directory, "--acme-ca", ca.https_ca,
                "--acme-state", str(tmp_path / "state"), "--acme-dns-server",
                world.knot.nameserver, "--acme-dns-key", world.tsig, "--acme-name", MX]
        assert world.poste("cert", "issue", *args).returncode == 0
        ca.stop()
        ca.start()  # same ports, no accounts
        done = world.poste("cert", "renew", "--force", *args)
        assert done.returncode == 0, done.stderr
        assert "forgot our account: registering again" in done.stderr
    finally:
        ca.stop()


def test_http01(world: AcmeWorld, tmp_path: Path) -> None:
    """For a DNS without UPDATE: the CA fetches the answer from port 80 of the name (here
    pebble's httpPort on the name's address, 127.0.0.1), where poste listens for the order."""
    from support.net import free_port

    assert world.pebble is not None
    state = tmp_path / "state"
    common = ["--acme-directory", world.pebble.directory, "--acme-ca", world.pebble.https_ca,
              "--acme-state", str(state), "--acme-name", MX, "--acme-challenge", "http-01"]
    done = world.poste("cert", "issue", *common,
                       "--acme-http-listen", f"127.0.0.1:{world.pebble.http_port}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"issued: {MX}, valid until"), done.stdout
    verify_chain(world, state / "cert.pem")
    # listening where the CA does not look: refused, one line, the certificate kept
    line = one_line_error(world.poste("cert", "renew", "--force", *common,
                                      "--acme-http-listen", f"127.0.0.1:{free_port()}"))
    assert f"the CA refused the HTTP-01 challenge: {MX}: " in line, line
    assert "kept the certificate valid until" in line
