"""`poste dkim verify FILE --nameserver`: one `[OK]`/`[ER]` line per signature, like blaze."""

from __future__ import annotations

import subprocess
from pathlib import Path

from support.cli import run_poste
from support.dkimkit import DOMAIN, dkim_zone_records, mail, make_key
from support.knot import knot_server, simple_zone


def poste(
    poste_bin: str, *args: str, data: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([poste_bin, *args], input=data, capture_output=True, timeout=60)


def test_verify_each_signature(tmp_path: Path, poste_bin: str) -> None:
    rsa_path, rsa_key = make_key(tmp_path, "rsa", "r1")
    ed_path, ed_key = make_key(tmp_path, "ed25519", "e1")
    other_path, _ = make_key(tmp_path, "ed25519", "gone")  # never published
    signed = poste(
        poste_bin,
        "dkim",
        "sign",
        "-d",
        DOMAIN,
        "-s",
        "r1",
        "-k",
        str(rsa_path),
        "-s",
        "e1",
        "-k",
        str(ed_path),
        "-s",
        "gone",
        "-k",
        str(other_path),
        data=mail(),
    )
    assert signed.returncode == 0, signed.stderr
    path = tmp_path / "m.eml"
    path.write_bytes(signed.stdout)
    zone = simple_zone(DOMAIN, dkim_zone_records([("r1", rsa_key), ("e1", ed_key)]))
    with knot_server(tmp_path / "knot", {DOMAIN: zone}) as ns:
        r = poste(poste_bin, "dkim", "verify", "--nameserver", ns.nameserver, "-v", str(path))
        assert r.stdout.decode().splitlines() == [
            f"[OK]: {DOMAIN}",
            f"[OK]: {DOMAIN}",
            f"[ER]: {DOMAIN}",
        ]
        assert r.returncode == 1  # not all of them verify
        assert b"gone._domainkey" in r.stderr  # -v says why

        path.write_bytes(signed.stdout.replace(b"Hi there.", b"Hi there!"))
        r = poste(poste_bin, "dkim", "verify", "--nameserver", f"tcp:{ns.nameserver}", str(path))
        assert r.stdout.decode().splitlines() == [f"[ER]: {DOMAIN}"] * 3

        path.write_bytes(mail())
        r = poste(poste_bin, "dkim", "verify", "--nameserver", ns.nameserver, str(path))
        assert r.returncode == 1 and r.stderr == b"Error: no DKIM-Signature in the mail\n"


def test_verify_bad_nameserver_is_one_line(tmp_path: Path, poste_bin: str) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(mail())
    r = run_poste(["dkim", "verify", "--nameserver", "not-an-ip", str(path)], text=False)
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert b"is not an IP address" in r.stderr.splitlines()[-1]
