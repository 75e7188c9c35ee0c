"""The systemd units are valid unit files (systemd-analyze verify) and run real commands."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).resolve().parent.parent / "systemd").glob("*.service"))


def test_a_unit_per_service_and_for_up() -> None:
    names = {u.stem for u in UNITS}
    assert names == {f"poste-{s}" for s in
                     ("up", "verifier", "spamfilter", "relay", "submission", "signer")}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies(unit: Path, poste_bin: str) -> None:
    text = unit.read_text()
    m = re.search(r"^ExecStart=/usr/local/bin/poste (\S+)", text, re.M)
    assert m
    helped = subprocess.run([poste_bin, m.group(1), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "/usr/local/bin/poste" not in line]
    assert not problems, problems
