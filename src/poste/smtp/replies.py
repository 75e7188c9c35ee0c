"""Every reply the SMTP core gives of its own, in one table (as aiosmtpd's statuscodes).

Stages and next hops answer with their own replies; these are the core's:
limits, syntax, states, TLS and AUTH plumbing.  `tests/test_core_replies.py`
checks the table (code and enhanced status agree, RFC 3463) and that the
core's modules hold no reply text outside it; the dialogues in
`tests/dialogs/` show each one on the wire.
"""

from __future__ import annotations

from poste.smtp.stage import Reply

# -- connection -------------------------------------------------------------
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0 Too many connections, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0 Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2 Timeout, closing connection")
CONNECT_FAILED = Reply(421, "4.3.0 Local error, try again later")
BYE = Reply(221, "2.0.0 Bye")
OK = Reply(250, "2.0.0 Ok")

# -- commands -----------------------------------------------------------------
CONTROL_IN_EHLO = Reply(501, "5.5.4 Control character in EHLO name")
CONTROL_IN_HELO = Reply(501, "5.5.4 Control character in HELO name")
VRFY = Reply(252, "2.5.0 Cannot VRFY user, but will accept message and attempt delivery")
NO_EXPN = Reply(502, "5.5.1 EXPN not available")
NEED_MAIL = Reply(503, "5.5.1 Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1 Error: need RCPT command")
SENDER_OK = Reply(250, "2.1.0 Ok")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7 Non-ASCII address needs SMTPUTF8 (RFC 6531)")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3 Too many recipients")

# -- DATA ---------------------------------------------------------------------
DATA_SYNTAX = Reply(501, "5.5.4 Syntax: DATA")
START_DATA = Reply(354, "End data with <CR><LF>.<CR><LF>")
LINE_TOO_LONG = Reply(500, "5.5.2 Line too long (RFC 5321 4.5.3.1.6)")
TOO_BIG = Reply(552, "5.3.4 Message too big")
NUL_IN_DATA = Reply(550, "5.6.0 NUL byte in message data refused")
BARE_CR_LF = Reply(550, "5.6.0 Bare CR or LF in message data refused (use CRLF)")

# -- AUTH and TLS -------------------------------------------------------------
BAD_BASE64 = Reply(501, "5.5.2 Can't decode base64")
BAD_AUTH_VALUE = Reply(501, "5.5.2 Can't split auth value")
FOREIGN_AUTHZID = Reply(535, "5.7.8 Authorization identity differs from login")
TLS_FAILED = Reply(454, "4.7.0 TLS handshake failed")

# -- trouble on our side --------------------------------------------------------
LOCAL_ERROR = Reply(451, "4.3.0 Local error in processing, try again later")
HOP_UNAVAILABLE = Reply(451, "4.4.1 Next hop unavailable, try again later")


ALL: dict[str, Reply] = {
    name: value for name, value in dict(globals()).items() if isinstance(value, Reply)
}
