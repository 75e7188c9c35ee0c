"""docs/settings.md, generated from the declarations (tests/test_settings_doc.py keeps it so).

Regenerate with `python -m poste.stack.settings_doc > docs/settings.md`.
"""

from __future__ import annotations

from collections.abc import Sequence

from poste.runtime import settings as st
from poste.runtime.settings import Setting
from poste.services.forward.settings import SETTINGS as FORWARD
from poste.stack.config import COMMON, SECTIONS, TOP

_KINDS = {
    st.STR: "text", st.STRS: "list", st.PATH: "path", st.FILE: "file", st.DIR: "folder",
    st.FILES: "list of files", st.INT: "integer", st.FLOAT: "number", st.FLAG: "true/false",
    st.DURATION: "duration", st.CHOICE: "choice", st.COUNT: "count", st.PROCS: "integer or auto",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(s: Setting, stack: bool) -> str:
    value = s.stack_default if stack and s.stack_default is not st._UNSET else s.default
    if value is None or value == () or (s.kind == st.FLAG and value is False):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`"


def _where(s: Setting, section: bool | None) -> str:
    if section is None:  # poste up's own keys
        return "key"
    if s.cli and s.stack and section:
        return "both"
    if s.cli:
        return "flag" + (f" (`poste up`: {s.stack_note})" if s.stack_note else "")
    return "key"


def table(settings: Sequence[Setting], section: bool | None = True) -> list[str]:
    """One row per setting; `section`: False for a command alone, None for `poste up`'s own."""
    rows = ["| key / flag | kind | default | where | help |", "|---|---|---|---|---|"]
    for s in settings:
        kind = _KINDS[s.kind] + (f" ({', '.join(s.choices)})" if s.choices else "")
        if s.min is not None or s.max is not None:
            low = "" if s.min is None else f"{s.min:g} ≤ "
            high = "" if s.max is None else f" ≤ {s.max:g}"
            kind += f", {low}x{high}"
        default = _default(s, stack=False)
        stack_default = _default(s, stack=True)
        if section and s.stack and stack_default != default:  # `poste up` listens elsewhere
            default = f"{default or 'none'} (`poste up`: {stack_default or 'none'})"
        required = " required (flag)" if s.required else ""
        rows.append(
            f"| `{s.key}` | {kind}{required} | {_cell(default)} | {_where(s, section)} |"
            f" {_cell(s.help or '')} |"
        )
    return rows


def markdown() -> str:
    out = [
        "# Settings",
        "",
        "Generated from the declarations (`services/<name>/settings.py`, shared ones in",
        "`runtime/settings.py`, `poste up`'s own in `stack/config.py`) by",
        "`python -m poste.stack.settings_doc`; a test keeps this file equal to it.",
        "",
        "Each row is a flag of the service's command (`--key`) and the key of the same",
        "name in its section of `poste up`'s TOML (`key` or `key_with_underscores`).",
        "*where*: `both`, `flag` (the command only) or `key` (`poste up` only).",
        "Durations are seconds or `200ms`, `30s`, `5m`, `4h`, `5d`.",
        "",
        "## `poste up`: keys before any section",
        "",
        "They are also the default of every section that has a key of that name.",
        "",
        *table(TOP, section=None),
        "",
        "## Every section",
        "",
        *table(COMMON, section=None),
        "",
    ]
    for name, settings in SECTIONS.items():
        out += [f"## `poste {name}` and `[{name}]`", "", *table(settings), ""]
    out += ["## `poste forward`", "", *table(FORWARD, section=False), ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
