"""aiosmtpd's per-connection introspection, remembered per class: the same answers."""

from __future__ import annotations

import inspect

import aiosmtpd.smtp

from poste.smtp import fast_init, server
from poste.smtp.client import SMTPHop
from poste.smtp.stage import Stage


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


async def test_dir_of_a_connection_and_its_handler_names_what_object_dir_does() -> None:
    """server.py's `__dir__` (class names once per class, then the instance's own): the
    same names as Python's own, so aiosmtpd finds the same smtp_* and handle_* methods."""
    service = server.SMTPService(Stage(), SMTPHop("127.0.0.1", 9), host="127.0.0.1", port=0)
    conn = server._Connection(service)
    for obj in (conn, conn.event_handler, server._Connection(service)):
        assert dir(obj) == sorted(object.__dir__(obj))
    hooks = {m.replace("smtp_", "") for m in dir(conn) if m.startswith("smtp_")}
    assert set(conn._smtp_methods) == hooks and {"MAIL", "RCPT", "DATA", "EHLO"} <= hooks
    assert set(conn._handle_hooks) == {"EHLO", "HELO", "MAIL", "RCPT", "RSET", "NOOP", "QUIT",
                                      "exception"}
