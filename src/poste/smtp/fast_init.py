"""aiosmtpd's per-connection introspection, done once per class instead.

aiosmtpd 1.4's `SMTP.__init__`, run for every connection, lists all members of
the protocol object and of its handler with `inspect.getmembers` (to find
`auth_*` methods) and takes `inspect.signature` of the EHLO hook: measured 6.5%
of `poste up`'s CPU at 5 KB mails, one connection each (issue 16, the profile
in docs/performance.md).  The answers depend on the classes only, so this module
gives aiosmtpd's module an `inspect` whose two functions remember them per
class (`getmembers` returns only the `auth_*` members, all aiosmtpd keeps);
everything else is the real `inspect`.  No subclass of ours sets an `auth_*`
attribute on an instance, which the per-class list would not see.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

_names: dict[type, list[str]] = {}
_signatures: dict[tuple[Any, type], inspect.Signature] = {}


def getmembers(obj: object) -> list[tuple[str, Any]]:
    """`inspect.getmembers(obj)` as aiosmtpd uses it: its `auth_*` members (of the class)."""
    cls = type(obj)
    names = _names.get(cls)
    if names is None:
        names = _names[cls] = [n for n, _ in inspect.getmembers(obj) if n.startswith("auth_")]
    return [(name, getattr(obj, name)) for name in names]


def signature(fn: Callable[..., Any]) -> inspect.Signature:
    func, owner = getattr(fn, "__func__", None), getattr(fn, "__self__", None)
    if func is None or owner is None:
        return inspect.signature(fn)
    key = (func, type(owner))
    sig = _signatures.get(key)
    if sig is None:
        sig = _signatures[key] = inspect.signature(fn)
    return sig


class _Inspect(ModuleType):
    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


def install(module: ModuleType) -> None:
    """Give `module` (aiosmtpd.smtp) the remembering `inspect`; idempotent."""
    if isinstance(getattr(module, "inspect", None), _Inspect):
        return
    shim = _Inspect("inspect")
    shim.getmembers = getmembers  # type: ignore[attr-defined]
    shim.signature = signature  # type: ignore[attr-defined]
    module.inspect = shim  # type: ignore[attr-defined]
