"""Bastion: a policy engine between AI agents and the LLMs and tools they use."""

from typing import TYPE_CHECKING, Any

from bastion.events import (
    EMPTY_CONTEXT,
    AuditEvent,
    Context,
    Decision,
    Effect,
    EventKind,
    Identity,
    ModelRequest,
    RequestInfo,
    RuleTrace,
    ToolCall,
    ToolResult,
    ToolSpec,
)
from bastion.policy import Diagnostic, LimitHit, Policy, PolicyError, Schema

if TYPE_CHECKING:
    from bastion.adapters.asgi import BastionMiddleware
    from bastion.adapters.pipeline import Guard
    from bastion.adapters.transport import AsyncBastionTransport, BastionTransport
    from bastion.identity import IdentityResolver

# The front doors are imported on first use, so `import bastion` (and the
# `bastion check` CLI) stays light.
_LAZY = {
    "BastionMiddleware": "bastion.adapters.asgi",
    "BastionTransport": "bastion.adapters.transport",
    "AsyncBastionTransport": "bastion.adapters.transport",
    "Guard": "bastion.adapters.pipeline",
    "IdentityResolver": "bastion.identity",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bastion' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "EMPTY_CONTEXT",
    "AsyncBastionTransport",
    "AuditEvent",
    "BastionMiddleware",
    "BastionTransport",
    "Context",
    "Decision",
    "Diagnostic",
    "Effect",
    "EventKind",
    "Guard",
    "Identity",
    "IdentityResolver",
    "LimitHit",
    "ModelRequest",
    "Policy",
    "PolicyError",
    "RequestInfo",
    "RuleTrace",
    "Schema",
    "ToolCall",
    "ToolResult",
    "ToolSpec",
]
