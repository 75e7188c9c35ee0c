"""aiosmtpd's per-connection introspection, remembered per class: the same answers."""

from __future__ import annotations

import inspect

import aiosmtpd.smtp

from poste.smtp import fast_init, server


def test_aiosmtpd_sees_the_same_members_and_hook_signatures() -> None:
    assert isinstance(aiosmtpd.smtp.inspect, fast_init._Inspect)  # installed by server.py

    class Handler:
        async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
            return responses

        def auth_CUSTOM(self) -> None: ...

    for obj in (Handler(), Handler(), server._Handler.__new__(server._Handler)):
        real = [(n, v) for n, v in inspect.getmembers(obj) if n.startswith("auth_")]
        ours = [(n, v) for n, v in fast_init.getmembers(obj) if n.startswith("auth_")]
        assert ours == real
    hook = Handler().handle_EHLO
    assert fast_init.signature(hook) == inspect.signature(hook)
    assert len(fast_init.signature(Handler().handle_EHLO).parameters) == 5
    assert aiosmtpd.smtp.inspect.isclass is inspect.isclass  # the rest is the real module
