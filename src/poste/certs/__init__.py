"""Certificates that look after themselves: an ACME (RFC 8555) client with DNS-01 over
RFC 2136 + TSIG, and the state folder it keeps its account and certificates in."""
