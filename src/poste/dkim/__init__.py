"""DKIM keys, signing, verification and ARC; dkimpy splits messages the fast way (fast_parse)
skips canonicalisation passes that would change nothing (fast_canon)
and does its RSA with OpenSSL (fast_rsa)."""

from poste.dkim import fast_canon, fast_parse, fast_rsa

fast_parse.install()
fast_canon.install()
fast_rsa.install()
