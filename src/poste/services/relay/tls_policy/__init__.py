"""The relay's outbound transport policy: MTA-STS (RFC 8461), DANE (RFC 7672), TLS-RPT (RFC 8460).

`policy.py` decides, per destination and MX host, what TLS a session needs;
`delivery.py` only asks it and applies the answer.
"""
