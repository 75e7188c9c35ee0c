"""`poste forward`'s settings (a command only: `poste up` has no passthrough)."""

from poste.runtime.settings import (
    DESTINATION,
    FLAG,
    HOSTNAME,
    LISTEN,
    OPERATIONS,
    TLS_CERT,
    TLS_KEY,
    Setting,
)

SETTINGS = (
    LISTEN,
    DESTINATION,
    HOSTNAME,
    TLS_CERT,
    TLS_KEY,
    Setting("require-tls", FLAG, default=False, help="Refuse mail before STARTTLS (530)."),
    *OPERATIONS,
)
