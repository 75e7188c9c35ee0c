"""docs/settings.md is what the declarations say (regenerate it, never edit it by hand)."""

from __future__ import annotations

from pathlib import Path

from poste.stack.settings_doc import markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def test_committed_table_is_the_generated_one() -> None:
    assert DOC.read_text() == markdown(), (
        "docs/settings.md is stale: python -m poste.stack.settings_doc > docs/settings.md")
