"""DKIM keys, signing, verification and ARC; dkimpy splits messages the fast way (fast_parse)."""

from poste.dkim import fast_parse

fast_parse.install()
