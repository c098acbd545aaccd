"""Tool definition pinning: notice when an MCP server changes the tools it first advertised."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bastion.errors import StoreError
from bastion.events import ToolSpec
from bastion.session.keys import digest
from bastion.session.store import SessionStore

__all__ = ["PinReport", "ToolPins", "tool_fingerprint"]

# The parts of a definition the model reads or the policy relies on; any of them
# changing can smuggle instructions or widen what a call does.
PINNED_FIELDS = ("title", "description", "input_schema", "output_schema", "annotations")


def _fields(tool: ToolSpec | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(tool, ToolSpec):
        return tool.name, {
            "title": None,
            "description": tool.description,
            "input_schema": dict(tool.input_schema),
            "output_schema": None,
            "annotations": dict(tool.annotations),
        }
    name = tool.get("name")
    if not isinstance(name, str):
        raise ValueError("a tool definition needs a string name")

    def pick(*names: str) -> Any:
        for n in names:
            if tool.get(n) is not None:
                return tool[n]
        return None

    return name, {
        "title": pick("title"),
        "description": pick("description") or "",
        "input_schema": pick("inputSchema", "input_schema") or {},
        "output_schema": pick("outputSchema", "output_schema"),
        "annotations": pick("annotations") or {},
    }


def tool_fingerprint(tool: ToolSpec | Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """(name, {field: sha256 of its canonical JSON}) for one tool definition.

    Accepts a :class:`ToolSpec` or an MCP tool object (``inputSchema`` or
    ``input_schema``). Missing fields fingerprint as empty, so a definition
    given either way fingerprints alike.
    """
    name, values = _fields(tool)
    return name, {f: digest("tool-field", f, values[f]) for f in PINNED_FIELDS}


@dataclass(frozen=True, slots=True)
class PinReport:
    """How a tools list differs from the server's pinned one.

    ``changed`` maps a tool name to the fields that differ (``description``,
    ``input_schema``...). ``first_seen`` is true when this list became the pin.
    """

    server: str
    first_seen: bool = False
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        """True when a tool was added or any pinned tool changed.

        Removed tools are reported but do not count: a server may advertise
        fewer tools to some callers, and a tool that is gone cannot be called.
        """
        return bool(self.added or self.changed)


class ToolPins:
    """Pins per MCP server, global across identities (the server is shared).

    The first tools list seen for a server becomes its pin; later lists are
    compared with it and the difference reported; the pin itself changes only
    through :meth:`accept` (an operator's decision), so a server cannot get a
    changed definition accepted by repeating it. Pin the upstream list before
    visibility filtering. Pins expire after ``ttl`` seconds (then the next list
    is pinned afresh). Concurrent first lists from several processes agree: one
    wins the pin, the others compare against it.
    """

    def __init__(self, store: SessionStore, *, ttl: float = 30 * 24 * 3600) -> None:
        self._store = store
        self._ttl = ttl

    @staticmethod
    def _key(server: str) -> str:
        return f"pins:{digest('pins', server)}"

    @staticmethod
    def _fingerprints(tools: Iterable[ToolSpec | Mapping[str, Any]]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for tool in tools:
            name, fp = tool_fingerprint(tool)
            if name in out and out[name] != fp:
                # Two different definitions under one name: report it as a change
                # of every field rather than letting either one win silently.
                out[name] = {f: "conflict" for f in PINNED_FIELDS}
            else:
                out[name] = fp
        return out

    async def check(self, server: str, tools: Iterable[ToolSpec | Mapping[str, Any]]) -> PinReport:
        """Compare ``tools`` with the server's pin, pinning them if it has none."""
        current = self._fingerprints(tools)
        encoded = json.dumps(current, sort_keys=True, separators=(",", ":")).encode("utf-8")
        if await self._store.add(self._key(server), encoded, self._ttl):
            return PinReport(server, first_seen=True)
        raw = await self._store.get(self._key(server))
        if raw is None:
            # Expired between the two calls: this list becomes the pin.
            await self._store.set(self._key(server), encoded, self._ttl)
            return PinReport(server, first_seen=True)
        pinned = self._decode(raw)
        changed = {
            name: tuple(f for f in PINNED_FIELDS if pinned[name].get(f) != fp.get(f))
            for name, fp in current.items()
            if name in pinned and pinned[name] != fp
        }
        return PinReport(
            server,
            added=tuple(sorted(set(current) - set(pinned))),
            removed=tuple(sorted(set(pinned) - set(current))),
            changed=changed,
        )

    async def accept(self, server: str, tools: Iterable[ToolSpec | Mapping[str, Any]]) -> None:
        """Make ``tools`` the server's pin (after an operator reviewed the change)."""
        encoded = json.dumps(self._fingerprints(tools), sort_keys=True, separators=(",", ":"))
        await self._store.set(self._key(server), encoded.encode("utf-8"), self._ttl)

    async def forget(self, server: str) -> None:
        """Drop the server's pin; the next list seen is pinned afresh."""
        await self._store.delete(self._key(server))

    @staticmethod
    def _decode(raw: bytes) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise StoreError("session store holds a malformed tool pin") from exc
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise StoreError("session store holds a malformed tool pin")
        return data
