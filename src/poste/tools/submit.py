"""`poste submit`: see poste.tools.send (they share everything but AUTH)."""

from poste.tools.send import submit as main

__all__ = ["main"]
