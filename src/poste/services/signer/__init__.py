"""The signer service: its stage, its command and the modules only it uses."""
