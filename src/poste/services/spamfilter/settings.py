"""The spamfilter's settings: `poste spamfilter` flags and `[spamfilter]` keys."""

from poste.runtime.settings import (
    DESTINATION,
    FILE,
    FLAG,
    FLOAT,
    HOSTNAME,
    LISTEN,
    OPERATIONS,
    TLS_CERT,
    TLS_KEY,
    Setting,
)
from poste.spam.model import Params

SETTINGS = (
    LISTEN,
    DESTINATION,
    Setting("db", FILE,
            help="Token database (default: the one shipped with poste). SIGHUP reloads it."),
    Setting("header-name", default="X-Spamtacus", show_default=True,
            help="Name of the label field."),
    Setting("detail", FLAG, default=False,
            help="Also add HEADER-NAME-Detail: with the score and the strongest tokens."),
    Setting("ham-cutoff", FLOAT, default=Params.ham_cutoff, min=0, max=1, show_default=True,
            help="Scores below this are labelled 'no'."),
    Setting("spam-cutoff", FLOAT, default=Params.spam_cutoff, min=0, max=1, show_default=True,
            help="Scores at or above this are labelled 'yes'."),
    HOSTNAME,
    TLS_CERT.but(stack=False),
    TLS_KEY.but(stack=False),
    *OPERATIONS,
)
