"""poste: a mail stack for your own domain."""

__version__ = "0.1.0"
