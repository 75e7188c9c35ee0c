"""DKIM keys, signing, verification and ARC; dkimpy splits messages the fast way (fast_parse)
and skips canonicalisation passes that would change nothing (fast_canon)."""

from poste.dkim import fast_canon, fast_parse

fast_parse.install()
fast_canon.install()
