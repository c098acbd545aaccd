"""Fixtures for the gateway tests (defined in :mod:`.harness`)."""

from .harness import start_gateway, upstreams

__all__ = ["start_gateway", "upstreams"]
