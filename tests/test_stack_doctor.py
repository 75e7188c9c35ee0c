"""`poste doctor` against a real DNS server (knot) serving a test zone: a good domain,
then a deliberately wrong SPF, a missing DMARC record, a stranger's DKIM key and PTR."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from poste.dkim.keys import generate, write_key
from poste.dns.records import zone_text
from poste.smtp.tls import self_signed
from support.cli import run_poste
from support.knot import KnotServer, simple_zone
from support.service import started

DOMAIN = "x25519.test"
MX = "mail.x25519.test"
IP = "127.0.0.61"


def _zone(spf: str | None, dmarc: bool, dkim_value: str | None, helo_spf: str | None = None) -> str:
    lines = [f"@ MX 10 {MX}.", f"mail A {IP}"]
    if helo_spf:
        lines.append(f'mail TXT "{helo_spf}"')
    if spf:
        lines.append(f'@ TXT "{spf}"')
    lines.append('@ TXT "google-site-verification=abc"')
    if dkim_value:
        from poste.dns.records import split_txt, zone_txt

        lines.append(f"poste._domainkey TXT {zone_txt(split_txt(dkim_value))}")
    if dmarc:
        lines.append('_dmarc TXT "v=DMARC1; p=reject; rua=mailto:postmaster@x25519.test"')
    return simple_zone(DOMAIN, "\n".join(lines) + "\n")


def _reverse(name: str) -> str:
    return simple_zone("0.0.127.in-addr.arpa", f"61 PTR {name}.\n")


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, str]:
    key = generate("rsa")
    key_path = tmp_path / "dkim.pem"
    write_key(key, key_path)
    cert, tkey = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, tkey, MX)
    return key_path, cert, key.txt_value()


@pytest.fixture
def mx_port(tmp_path: Path, keys: tuple[Path, Path, str], poste_bin: str) -> Iterator[int]:
    """Our MX's port 25 stand-in: `poste srv` with STARTTLS and the self-signed certificate."""
    _, cert, _ = keys
    key = cert.with_name("key.pem")
    with started([poste_bin, "srv", f"{IP}:0", "-o", f"{tmp_path}/mx/", "--count", "0",
                  "-k", str(key), "-c", str(cert)], tmp_path / "srv.log", host=IP) as (_, [port]):
        yield port


def _doctor(poste_bin: str, ns: KnotServer, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [poste_bin, "doctor", "--domain", DOMAIN, "--nameserver", ns.nameserver,
         "--timeout", "2", *extra],
        capture_output=True, text=True, timeout=120,
    )


def _status(out: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("ok", "missing", "wrong", "skip", "warn"):
            found.setdefault(parts[1], parts[0])
    return found


def test_doctor_all_ok(tmp_path: Path, poste_bin: str, keys, mx_port: int) -> None:
    key_path, cert, dkim_value = keys
    zones = {DOMAIN: _zone(f"v=spf1 ip4:{IP} -all", True, dkim_value, "v=spf1 a -all"),
             "0.0.127.in-addr.arpa": _reverse(MX)}
    with KnotServer(tmp_path / "knot", zones) as ns:
        r = _doctor(poste_bin, ns, "--selector", "poste", "--dkim-key", str(key_path),
                    "--smtp-port", str(mx_port), "--tls-ca", str(cert))
    assert r.returncode == 0, r.stdout + r.stderr
    st = _status(r.stdout)
    assert st == {"MX": "ok", "SPF": "ok", "HELO": "ok", "DKIM": "ok", "DMARC": "ok", "PTR": "ok",
                  "TLS": "ok", "TLSRPT": "skip", "STS": "skip"}, r.stdout  # the two optional
    assert "publish:" not in r.stdout
    assert f"{IP} -> {MX} -> {IP}" in r.stdout


def test_doctor_warns_of_a_certificate_near_its_end(
    tmp_path: Path, poste_bin: str, keys: tuple[Path, Path, str]
) -> None:
    """10 days left: renewal (at 30 days left) has been failing; a warning, not a failure."""
    key_path, _, dkim_value = keys
    cert, key = tmp_path / "short.pem", tmp_path / "short.key"
    self_signed(cert, key, MX, days=10)
    zones = {DOMAIN: _zone(f"v=spf1 ip4:{IP} -all", True, dkim_value, "v=spf1 a -all"),
             "0.0.127.in-addr.arpa": _reverse(MX)}
    with started([poste_bin, "srv", f"{IP}:0", "-o", f"{tmp_path}/mx/", "--count", "0",
                  "-k", str(key), "-c", str(cert)], tmp_path / "srv.log", host=IP) as (_, [port]):
        with KnotServer(tmp_path / "knot", zones) as ns:
            r = _doctor(poste_bin, ns, "--selector", "poste", "--dkim-key", str(key_path),
                        "--smtp-port", str(port), "--tls-ca", str(cert))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _status(r.stdout)["TLS"] == "warn", r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("warn"))
    assert "expires in 9.9 days" in line or "expires in 10.0 days" in line, line
    assert "poste cert renew" in line


def test_doctor_wrong_spf_missing_dmarc(tmp_path: Path, poste_bin: str, keys, mx_port: int) -> None:
    key_path, _cert, _ = keys
    stranger = generate("rsa").txt_value()
    zones = {DOMAIN: _zone("v=spf1 ip4:192.0.2.1 -all", False, stranger, "v=spf1 -all"),
             "0.0.127.in-addr.arpa": _reverse("vps-61.hoster.example")}
    with KnotServer(tmp_path / "knot", zones) as ns:
        # no --tls-ca: the self-signed certificate is not trusted by the system's CAs
        r = _doctor(poste_bin, ns, "--selector", "poste", "--dkim-key", str(key_path),
                    "--smtp-port", str(mx_port))
    assert r.returncode == 1
    st = _status(r.stdout)
    assert st["MX"] == "ok"
    assert st["SPF"] == "wrong" and st["DMARC"] == "missing", r.stdout
    # a bounce (from <>) is checked against the HELO name: ours allows nobody
    assert st["HELO"] == "wrong" and f'{MX}. 3600 IN TXT "v=spf1 a -all"' in r.stdout
    assert st["DKIM"] == "wrong" and st["PTR"] == "wrong" and st["TLS"] == "wrong", r.stdout
    # the fix keeps what the record allowed and adds our address before -all
    assert f'x25519.test. 3600 IN TXT "v=spf1 ip4:192.0.2.1 ip4:{IP} -all"' in r.stdout
    assert '_dmarc.x25519.test. 3600 IN TXT "v=DMARC1; p=quarantine;' in r.stdout
    from poste.dkim.keys import dkim_record, load_key

    ours = zone_text([dkim_record(DOMAIN, "poste", load_key(key_path))]).strip()
    assert ours in r.stdout  # the record to publish is our key's, split as in `poste init`
    assert f"61.0.0.127.in-addr.arpa. 3600 IN PTR {MX}." in r.stdout
    assert "certificate not valid" in r.stdout and "self-signed" in r.stdout
    assert "2 problem" not in r.stderr and "problem(s)" in r.stderr


def test_doctor_missing_everything(tmp_path: Path, poste_bin: str) -> None:
    zones = {DOMAIN: simple_zone(DOMAIN, "")}
    with KnotServer(tmp_path / "knot", zones) as ns:
        r = _doctor(poste_bin, ns, "--address", IP)
    assert r.returncode == 1
    st = _status(r.stdout)
    assert st["MX"] == "missing" and st["SPF"] == "missing" and st["DMARC"] == "missing"
    assert st["PTR"] == "missing" and st["HELO"] == "missing"
    assert f"x25519.test. 3600 IN MX 10 {MX}." in r.stdout
    assert f'{MX}. 3600 IN TXT "v=spf1 a -all"' in r.stdout


def test_doctor_bad_flags(poste_bin: str) -> None:
    r = run_poste(["doctor", "--domain", "not a domain"])  # poste.cli.main in this process
    assert r.returncode != 0 and "Traceback" not in r.stderr
    r = run_poste(["doctor", "--domain", DOMAIN, "--address", "nope"])
    assert r.returncode != 0 and "not an IP address" in r.stderr
