"""The policy language and its engine: ``Policy.load(...)`` then ``policy.decide_*``."""

from bastion.policy.compiler import LimitHit
from bastion.policy.diagnostics import Diagnostic, PolicyError, format_diagnostics
from bastion.policy.engine import Policy
from bastion.policy.schema import Schema, ToolDecl

__all__ = [
    "Diagnostic",
    "LimitHit",
    "Policy",
    "PolicyError",
    "Schema",
    "ToolDecl",
    "format_diagnostics",
]
