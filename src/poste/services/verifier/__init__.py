"""The verifier service: its stage, its command and the modules only it uses."""
