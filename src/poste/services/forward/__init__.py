"""The passthrough service."""
