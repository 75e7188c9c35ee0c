"""Bad `poste up` configurations as data: one file each in tests/configs/bad/.

Each file's first line, `# error: MESSAGE`, is the one line `poste up` must
print for it (after the file's name): a reader of the folder sees every
mistake poste catches and what it says.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from poste.stack.config import ConfigError, load

BAD = Path(__file__).parent / "configs" / "bad"


@pytest.mark.parametrize("path", sorted(BAD.glob("*.toml")), ids=lambda p: p.stem)
def test_bad_config_says_one_line(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# error: "), f"{path.name}: first line must be '# error: ...'"
    with pytest.raises(ConfigError) as exc:
        load(path)
    text = str(exc.value)
    assert "\n" not in text
    assert text == f"{path}: {first[len('# error: '):]}"
