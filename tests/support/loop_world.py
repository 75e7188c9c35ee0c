"""The seed article's world, on loopback: x25519.test, gmail.test, outlook.test.

A real DNS server (knot, on port 53 of a loopback address of its own so that
opendkim-testmsg can use it too) serves the three zones; `poste srv` stands
in for the Gmail and Outlook MX hosts; our services get 127.0.0.10-14 (the
article's separate unikernels), one port shared by all, as port 25 was.
On loopback every outgoing connection leaves from 127.0.0.1, so that is our
relay's address in SPF; "Gmail" sends from its own 127.0.0.21.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from poste.dkim.keys import generate, write_key
from poste.dns.records import split_txt, zone_txt
from support import opendkim
from support.cli import run_poste
from support.knot import KnotServer, simple_zone
from support.net import free_port, wait_port
from support.relay_env import common_port
from support.standin import StandIn, StandIns

DOMAIN = "x25519.test"
LOGIN = f"login@{DOMAIN}"
PASSWORD = "correct horse battery staple"
GMAIL_IP, OUTLOOK_IP = "127.0.0.21", "127.0.0.22"
OUR_OUTGOING_IP = "127.0.0.1"
HOSTS = {
    "verifier": "127.0.0.10",
    "spamfilter": "127.0.0.11",
    "relay": "127.0.0.12",
    "submission": "127.0.0.13",
    "signer": "127.0.0.14",
}
NAMES = {
    "verifier": "mail.x25519.test",
    "spamfilter": "spamfilter.x25519.test",
    "relay": "relay.x25519.test",
    "submission": "submission.x25519.test",
    "signer": "signer.x25519.test",
}


# more settings per service name: [(key, TOML value)], e.g. ("spam-cutoff", "0.0")
Extra = dict[str, list[tuple[str, str]]]


def zones(dkim_txt: str) -> dict[str, str]:
    ours = "\n".join([
        f"@ MX 10 {NAMES['verifier']}.",
        f"mail A {HOSTS['verifier']}",
        f'@ TXT "v=spf1 mx ip4:{OUR_OUTGOING_IP} -all"',
        f"poste._domainkey TXT {zone_txt(split_txt(dkim_txt))}",
        f'_dmarc TXT "v=DMARC1; p=reject; rua=mailto:hostmaster@{DOMAIN}"',
    ])
    gmail = "\n".join([
        "@ MX 10 mx.gmail.test.", f"mx A {GMAIL_IP}", f'@ TXT "v=spf1 ip4:{GMAIL_IP} -all"',
    ])
    outlook = "\n".join([
        "@ MX 10 mx.outlook.test.", f"mx A {OUTLOOK_IP}",
        f'@ TXT "v=spf1 ip4:{OUTLOOK_IP} -all"',
    ])
    return {
        DOMAIN: simple_zone(DOMAIN, ours + "\n"),
        "gmail.test": simple_zone("gmail.test", gmail + "\n"),
        "outlook.test": simple_zone("outlook.test", outlook + "\n"),
    }


@dataclass
class World:
    tmp: Path
    poste_bin: str
    knot: KnotServer
    ns_host: str
    gmail: StandIn
    outlook: StandIn
    smtp_port: int
    users: Path
    dkim_key: Path
    cert: Path
    key: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    mx: StandIns | None = None
    by_name: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def nameserver(self) -> str:
        return f"{self.ns_host}:53"

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("POSTE_")
                    or k == "POSTE_WORKERS"}
        full_env.update(env or {})
        proc = subprocess.Popen([self.poste_bin, *args], stdout=log, stderr=log, env=full_env,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        self.by_name[name] = proc
        return proc

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.mx is not None:
            self.mx.close()
        self.knot.stop()
        for cleanup in self.cleanups:
            cleanup()


def make_world(tmp: Path, poste_bin: str) -> World:
    key = generate("rsa")
    dkim_key = tmp / "dkim" / "poste.pem"
    dkim_key.parent.mkdir()
    write_key(key, dkim_key)
    cert, tls_key = tmp / "cert.pem", tmp / "key.pem"
    certificate(cert, tls_key)
    ns_host = opendkim.port53_host()
    knot = KnotServer(tmp / "knot", zones(key.txt_value()), host=ns_host, port=53)
    knot.start()
    # Gmail's and Outlook's MX: `poste srv`'s mailbox in this process, on one port
    # held on both addresses (support/standin.py).
    mx = StandIns([GMAIL_IP, OUTLOOK_IP])
    smtp_port = mx.port
    gmail = mx.start(GMAIL_IP, tmp / "gmail")
    outlook = mx.start(OUTLOOK_IP, tmp / "outlook")
    users = tmp / "users"
    # Step 1 of the recap: the admin adds the user, whose mail goes to Gmail
    # (`poste users add`, run in this process through poste.cli.main).
    for argv, stdin in (
        (["users", "add", "login", "--repo", str(users), "--target", "login@gmail.test",
          "--password-stdin"], PASSWORD + "\n"),
        (["users", "add", "hostmaster", "--repo", str(users), "--target", "admin@outlook.test",
          "--no-password"], ""),
    ):
        ran = run_poste(argv, input=stdin)
        assert ran.returncode == 0, ran.stderr
    return World(tmp, poste_bin, knot, ns_host, gmail, outlook, smtp_port, users, dkim_key,
                 cert, tls_key, mx=mx)


@pytest.fixture
def world(tmp_path: Path, poste_bin: str) -> Iterator[World]:
    """Fixture: the world of `make_world`, stopped at teardown.

    Use it with `from support.loop_world import world  # noqa: F401` in a test module.
    """
    w = make_world(tmp_path, poste_bin)
    try:
        yield w
    finally:
        w.stop()


def up_config(world: World, port: int, port_tls: int | None = None, top: str = "",
              extra: Extra | None = None, spam_db: Path | None = None) -> Path:
    """The article's stack as one `poste up` config: MX and submission on `port`
    (implicit TLS on `port_tls` when given), `top` added to the top-level keys,
    `extra` to each service's section; `spam_db`: the spamfilter's database, which
    learn mails then train."""
    config = world.tmp / "poste.toml"
    more = {name: "".join(f"{k} = {v}\n" for k, v in (extra or {}).get(name, []))
            for name in HOSTS}
    sub_host = HOSTS["submission"]
    tls_line = f'listen-tls = "{sub_host}:{port_tls}"\n' if port_tls is not None else ""
    config.write_text(f"""
domain = ["{DOMAIN}"]
postmaster = "hostmaster@{DOMAIN}"
tls-cert = "{world.cert}"
tls-key = "{world.key}"
users = "{world.users}"
nameserver = ["{world.nameserver}"]
{top}
[verifier]
listen = "{HOSTS['verifier']}:{port}"
hostname = "{NAMES['verifier']}"
{more['verifier']}
[spamfilter]
hostname = "{NAMES['spamfilter']}"
{more['spamfilter']}
{f'db = "{spam_db}"' if spam_db else ""}

[relay]
spool = "spool"
hostname = "{NAMES['relay']}"
smtp-port = {world.smtp_port}
no-ipv6 = true
{more['relay']}
[submission]
{tls_line}listen = "{HOSTS['submission']}:{port}"
hostname = "{NAMES['submission']}"

[signer]
hostname = "{NAMES['signer']}"
selector = ["poste"]
private-key = ["{world.dkim_key}"]
""")
    return config


@contextlib.contextmanager
def inbound(tmp: Path, poste_bin: str, topology: str, spam_db: Path | None = None,
            metrics: str | None = None) -> Iterator[tuple[World, tuple[str, int]]]:
    """A world and its receiving path in `topology` ("separate" or "up"), stopped after."""
    world = make_world(tmp, poste_bin)
    try:
        yield world, start_inbound(world, topology, spam_db=spam_db, metrics=metrics)
    finally:
        world.stop()


def start_inbound(world: World, topology: str, extra: Extra | None = None,
                  spam_db: Path | None = None, metrics: str | None = None) -> tuple[str, int]:
    """The receiving path, as `poste up` ("up") or as verifier -> spamfilter -> relay
    processes ("separate"), ready on the returned (address, port) of the verifier.
    `extra`: more settings per service, as (key, TOML value): `--key value` when separate;
    `spam_db`: the spamfilter's database, trained by learn mails at the relay;
    `metrics`: where `poste up` (or the relay) serves its metrics."""
    h = HOSTS

    def flags(name: str) -> list[str]:
        return [a for k, v in (extra or {}).get(name, []) for a in (f"--{k}", v.strip('"'))]

    if topology == "up":
        port = common_port([h["verifier"], h["submission"]])
        top = f'metrics = "{metrics}"\n' if metrics else ""
        world.spawn("up", ["up", "--config", str(up_config(world, port, top=top, extra=extra,
                                                           spam_db=spam_db))])
        waits = [h["verifier"]]
    else:
        port = common_port([h["verifier"], h["spamfilter"], h["relay"]])
        learn = (["--learn-db", str(spam_db), "--arc-authserv-id", NAMES["verifier"]]
                 if spam_db else [])
        world.spawn("relay", [
            "relay", "--domain", DOMAIN, "--postmaster", f"hostmaster@{DOMAIN}",
            "--users", str(world.users), "--spool", str(world.tmp / "spool"),
            "--listen", f"{h['relay']}:{port}", "--nameserver", world.nameserver,
            "--smtp-port", str(world.smtp_port), "--no-ipv6",
            "--hostname", NAMES["relay"], *learn, *flags("relay"),
            *(["--metrics", metrics] if metrics else [])])
        world.spawn("spamfilter", ["spamfilter", "--listen", f"{h['spamfilter']}:{port}",
                                   "--destination", f"{h['relay']}:{port}",
                                   "--hostname", NAMES["spamfilter"], *flags("spamfilter"),
                                   *(["--db", str(spam_db)] if spam_db else [])])
        world.spawn("verifier", [
            "verifier", "--domain", DOMAIN, "--postmaster", f"hostmaster@{DOMAIN}",
            "--destination", f"{h['spamfilter']}:{port}",
            "--listen", f"{h['verifier']}:{port}", "--nameserver", world.nameserver,
            "--hostname", NAMES["verifier"], *flags("verifier")])
        waits = [h["verifier"], h["relay"], h["spamfilter"]]
    try:
        for host in waits:
            wait_port(host, port, timeout=30)
    except TimeoutError:
        raise AssertionError(world.logs()) from None
    return h["verifier"], port


def certificate(cert_path: Path, key_path: Path) -> None:
    """Self-signed, valid for every service's name and loopback address (--tls-verify works)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAMES["verifier"])])
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in NAMES.values()]
    alt += [x509.IPAddress(ipaddress.ip_address(h)) for h in HOSTS.values()]
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def metrics(addr: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape http://addr/metrics (what `curl` shows) into {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def total(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (e.g. every result of spf)."""
    return sum(v for (n, ls), v in m.items()
               if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def head(mail: bytes) -> str:
    text = mail.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    return re.sub(r"\r\n[ \t]+", " ", text)


def fields(mail: bytes, name: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in head(mail).split("\r\n")
            if line.lower().startswith(name.lower() + ":")]


def received_by(mail: bytes) -> list[str]:
    """The `by` host of each Received:, top (last hop) first."""
    return [m.group(1) for r in fields(mail, "Received")
            if (m := re.search(r"\bby (\S+)", r))]


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--timeout", "30", *args], capture_output=True, text=True,
                          timeout=90)


@dataclass
class Entry:
    """Where the scenario talks to the stack."""

    verifier: tuple[str, int]
    submission_tls: tuple[str, int]
    submission: tuple[str, int]


def run_scenario(world: World, entry: Entry) -> tuple[bytes, bytes]:
    """The article's recap, steps 2-8; returns (the Gmail mail, the Outlook mail)."""
    # 2. Gmail checks the "Send mail as" credentials: AUTH on implicit TLS (465 style).
    host, port = entry.submission_tls
    r = swaks("--server", host, "--port", str(port), "--tlsc", "--auth", "LOGIN",
              "--auth-user", LOGIN, "--auth-password", PASSWORD, "--quit-after", "AUTH")
    assert r.returncode == 0 and "235 " in r.stdout, r.stdout + r.stderr + world.logs()
    # 3. Gmail sends the confirmation mail to login@x25519.test, to our MX, from its own IP.
    host, port = entry.verifier
    r = swaks("--server", host, "--port", str(port), "--tls", "--local-interface", GMAIL_IP,
              "--ehlo", "mx.gmail.test", "--from", "forwarding-noreply@gmail.test",
              "--to", LOGIN, "--header", f"Subject: Gmail Confirmation - Send Mail as {LOGIN}",
              "--body", "Confirmation code: 123456789")
    assert r.returncode == 0, r.stdout + r.stderr + world.logs()
    # 4-5. verifier -> spamfilter -> relay -> Gmail (the user's target).
    try:
        confirmation = world.gmail.wait(1)[0]
    except TimeoutError:
        raise AssertionError(world.logs()) from None
    # 6. Mail sent as login@x25519.test through submission (587 style, STARTTLS).
    host, port = entry.submission
    mail = (
        f"From: {LOGIN}\r\nTo: friend@outlook.test\r\nSubject: sent as x25519\r\n"
        f"Message-ID: <loop-{time.time_ns()}@{DOMAIN}>\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nHello Outlook!\r\n"
    )
    r = subprocess.run(
        [world.poste_bin, "submit", "-", f"{host}:{port}", "-s", LOGIN, "-r",
         "friend@outlook.test", "-u", LOGIN, "-p", PASSWORD, "--tls-verify", str(world.cert)],
        input=mail.encode(), capture_output=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr.decode() + world.logs()
    # 7-8. submission -> signer -> relay -> Outlook.
    try:
        sent = world.outlook.wait(1)[0]
    except TimeoutError:
        raise AssertionError(world.logs()) from None
    return confirmation, sent


def check_confirmation(mail: bytes) -> None:
    """What the article shows of the mail forwarded back to Gmail."""
    by = received_by(mail)
    # top first: Gmail's MX, then our relay, spamfilter, verifier
    assert by[:4] == [f"mx-{GMAIL_IP}", NAMES["relay"], NAMES["spamfilter"], NAMES["verifier"]], by
    bottom = fields(mail, "Received")[3]
    assert f"[{GMAIL_IP}]" in bottom and "mx.gmail.test" in bottom and "ESMTPS" in bottom, bottom
    spf = fields(mail, "Received-SPF")
    assert len(spf) == 1 and spf[0].startswith("pass "), spf
    assert f"client-ip={GMAIL_IP}" in spf[0]
    spam = fields(mail, "X-Spamtacus")
    assert len(spam) == 1 and spam[0] in ("yes", "no", "unknown"), spam
    ar = fields(mail, "Authentication-Results")
    assert ar and "spf=pass" in ar[0], ar
    assert fields(mail, "Delivered-To") == ["login@gmail.test"]
    # forwarded: the envelope sender is SRS-rewritten into our domain, so SPF holds at Gmail
    rp = fields(mail, "Return-Path")[0].strip("<>")
    assert rp.startswith("SRS0=") and rp.endswith(f"@{DOMAIN}"), rp
    assert "Confirmation code: 123456789" in mail.decode()


def check_sealed(world: World, mail: bytes) -> None:
    """The forwarded mail carries our ARC set over the verifier's results, valid to dkimpy."""
    import dkim

    from support.authkit import txt_func

    seal = fields(mail, "ARC-Seal")
    assert len(seal) == 1 and seal[0].startswith("i=1; cv=none;") and f"d={DOMAIN}" in seal[0]
    aar = fields(mail, "ARC-Authentication-Results")
    assert len(aar) == 1 and aar[0].startswith(f"i=1; {NAMES['verifier']};"), aar
    assert "spf=pass" in aar[0] and "arc=none" in aar[0], aar
    cv, _, why = dkim.arc_verify(mail, dnsfunc=txt_func(world.nameserver))
    assert cv == dkim.CV_Pass, why
    from support import arcref

    assert arcref.validate(mail, txt_func(world.nameserver)) == "pass"


def check_sent(world: World, mail: bytes) -> None:
    """The mail sent as login@x25519.test: DKIM verifies, SPF passes for its envelope sender."""
    from poste.dkim.verify import verify
    from poste.services.verifier.spf import check_sync, resolver_for

    by = received_by(mail)
    assert by[:4] == [f"mx-{OUTLOOK_IP}", NAMES["relay"], NAMES["signer"], NAMES["submission"]], by
    assert "ESMTPSA" in fields(mail, "Received")[3]
    sigs = fields(mail, "DKIM-Signature")
    assert len(sigs) == 1 and "d=x25519.test" in sigs[0] and "s=poste" in sigs[0], sigs
    # dkimpy, keys from knot
    results = verify(mail, resolver_for([world.nameserver]))
    assert [r.result for r in results] == ["pass"], results
    # and an independent implementation: opendkim-testmsg, also against knot
    if opendkim.available():
        out = opendkim.testmsg(mail, world.ns_host, world.tmp / "opendkim")
        assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr
    rp = fields(mail, "Return-Path")[0].strip("<>")
    assert rp == LOGIN
    top = fields(mail, "Received")[0]  # Outlook's own: the address we connected from
    m = re.search(r"\[(\d+\.\d+\.\d+\.\d+)\]", top)
    assert m, top
    helo = top.split()[1]
    spf = check_sync(m.group(1), rp, helo, resolver_for([world.nameserver]))
    assert spf.result == "pass", spf


def wait_for(fn, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


__all__ = [
    "HOSTS",
    "NAMES",
    "Entry",
    "World",
    "check_confirmation",
    "check_sent",
    "free_port",
    "make_world",
    "metrics",
    "run_scenario",
    "sample",
    "total",
    "up_config",
    "wait_port",
]
