"""Submission's settings: `poste submission` flags and `[submission]` keys."""

from poste.runtime.settings import (
    ACME,
    DESTINATION,
    DIR,
    FLOAT,
    HOSTNAME,
    INT,
    LISTEN,
    OPERATIONS,
    PATH,
    STR,
    STRS,
    TLS_CERT,
    TLS_KEY,
    Setting,
)

SETTINGS = (
    Setting("domain", STRS, required=True,
            help="Our domain: the users repository's root entries (repeat for more domains)."),
    DESTINATION,
    Setting("users", DIR, required=True, help="The Git users repository."),
    TLS_CERT,
    TLS_KEY,
    *ACME,
    Setting("listen-tls", STR, metavar="ADDR:PORT",
            help="Implicit TLS listener (port 465 style; default 0.0.0.0:465)."),
    LISTEN.but(default=None, show_default=False,
               help="STARTTLS listener, TLS mandatory (port 587 style; default 0.0.0.0:587)."),
    HOSTNAME,
    Setting("poll-interval", FLOAT, default=2.0, min=0.05, show_default=True,
            help="Seconds between checks of the users repository's HEAD"
                 " (SIGHUP reloads at once).",
            stack=False,
            stack_note="one users watcher there, for relay and submission:"
                       " set [relay] users-poll"),
    Setting("auth-delay", FLOAT, default=0.5, min=0, show_default=True,
            help="Delay before answering the first failed login of a client;"
                 " doubles per failure."),
    Setting("auth-max-delay", FLOAT, default=8.0, min=0, show_default=True),
    Setting("auth-max-failures", INT, default=10, min=1, show_default=True,
            help="Failed logins (within --auth-lockout seconds) before a client address"
                 " is locked out."),
    Setting("auth-net-failures", INT, default=30, min=1, show_default=True,
            help="Failed logins before a client network (IPv4 /24, IPv6 /48) is locked out."),
    Setting("auth-account-failures", INT, default=10, min=1, show_default=True,
            help="Failed logins against one account after which only clients that have not"
                 " failed against it may try it."),
    Setting("auth-state", PATH, metavar="FILE",
            help="File keeping the failed-login counters across restarts (JSON; default:"
                 " memory only; in poste up: submission-auth.json beside the relay spool)."),
    Setting("auth-lockout", FLOAT, default=900.0, min=0, show_default=True,
            help="Seconds a locked-out client or network gets 454 to AUTH."),
    Setting("auth-concurrency", INT, default=4, min=1, show_default=True,
            help="Password checks running at once (argon2id takes 19 MiB each; an older"
                 " 64 MiB hash until its user's next login rewrites it)."),
    Setting("auth-cache", FLOAT, default=60.0, min=0, show_default=True,
            help="Seconds a successful login is remembered (under a keyed hash of the"
                 " credentials), so a client logging in for each mail pays one password"
                 " check; 0: never."),
    *OPERATIONS,
)
