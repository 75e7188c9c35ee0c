"""The systemd units are valid unit files (systemd-analyze verify) and run real commands.

They run the install that docs/deploy.md describes: scripts/install puts poste in a venv at
/opt/poste, so every unit's ExecStart is /opt/poste/bin/poste.  Where that install exists
(CI's deploy step) the units are verified as they are; elsewhere a copy pointing at the
poste under test is verified, with nothing filtered out of what systemd-analyze says.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))
INSTALLED = "/opt/poste/bin/poste"  # scripts/install's default PREFIX, as docs/deploy.md says


def test_a_unit_per_service_and_for_up() -> None:
    names = {u.stem for u in UNITS}
    assert names == {f"poste-{s}" for s in
                     ("up", "verifier", "spamfilter", "relay", "submission", "signer")}


def test_one_install_story() -> None:
    """README, docs/deploy.md and the units name the same install, from the clone."""
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for text in (deploy, readme):
        assert "scripts/install" in text
        assert "pip install poste" not in text  # not on PyPI
    assert INSTALLED in deploy


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies(unit: Path, poste_bin: str, tmp_path: Path) -> None:
    text = unit.read_text()
    m = re.search(rf"^ExecStart={re.escape(INSTALLED)} (\S+)", text, re.M)
    assert m, f"{unit.name}: ExecStart does not run {INSTALLED}"
    helped = subprocess.run([poste_bin, m.group(1), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "ProtectHome=yes" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    if not os.access(INSTALLED, os.X_OK):
        copy = tmp_path / unit.name
        copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={poste_bin} "))
        unit = copy
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    said = (out.stdout + out.stderr).strip()
    assert out.returncode == 0 and not said, said
