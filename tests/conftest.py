from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def poste_bin() -> str:
    """The installed `poste` entry point (the one a user runs)."""
    exe = Path(sys.executable).parent / "poste"
    if exe.exists():
        return str(exe)
    found = shutil.which("poste")
    assert found, "poste is not installed (pip install -e .)"
    return found


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return Path(os.environ.get("POSTE_SHARED", SHARED))
