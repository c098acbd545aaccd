"""Session keys and canonical JSON: how state is addressed, always within one identity."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bastion.events import Identity

__all__ = [
    "DEFAULT_CONVERSATION_HEADER",
    "STATELESS_MCP_REVISION",
    "SessionKey",
    "canonical_json",
    "digest",
]

STATELESS_MCP_REVISION = "2026-07-28"
DEFAULT_CONVERSATION_HEADER = "x-bastion-conversation"

KeyKind = Literal["mcp-session", "conversation", "identity"]


def _normalise(value: Any, path: str) -> Any:
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"canonical JSON needs string keys, got {key!r} at {path}")
            nkey = unicodedata.normalize("NFC", key)
            if nkey in out:
                # Two keys that differ only in Unicode form would collapse into
                # one: two different argument objects would then hash alike.
                raise ValueError(f"keys collide after Unicode normalisation at {path}: {key!r}")
            out[nkey] = _normalise(item, f"{path}.{nkey}")
        return out
    if isinstance(value, list | tuple):
        return [_normalise(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, bool | int | float):
        return value
    raise ValueError(f"not a JSON value at {path}: {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no whitespace, every string in Unicode NFC.

    Refuses NaN and infinities, non-string keys, non-JSON values and keys that
    only differ in Unicode form (:class:`ValueError`). ``1`` and ``1.0`` stay
    distinct.
    """
    return json.dumps(
        _normalise(value, "$"),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def digest(*parts: Any) -> str:
    """Hex sha256 of the canonical JSON of ``parts`` (a list, so parts never run together)."""
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            value = value.strip()
            return value or None
    return None


@dataclass(frozen=True, slots=True)
class SessionKey:
    """Where one MCP session's state lives: an identity, plus a session within it.

    ``kind`` says what ``value`` is: the ``Mcp-Session-Id`` (handshake
    revisions), a conversation key from a configurable header (the stateless
    2026-07-28 revision, or a handshake server that issued no session id), or
    nothing beyond the identity itself (``identity``: every request of that
    identity without a session or conversation key shares one state).

    The identity (tenant and subject) is always part of :attr:`id`: a caller who
    sends someone else's session id reaches a different, empty state, never
    theirs. The id is a digest, so the client-chosen value cannot inject
    separators into store keys.
    """

    subject: str
    tenant: str | None
    kind: KeyKind
    value: str = ""

    @property
    def id(self) -> str:
        """The store-safe identifier of this session (hex sha256)."""
        return digest("session", self.tenant, self.subject, self.kind, self.value)

    @classmethod
    def for_identity(cls, identity: Identity) -> SessionKey:
        """The per-identity fallback key."""
        return cls(identity.subject, identity.tenant, "identity")

    @classmethod
    def from_request(
        cls,
        identity: Identity,
        headers: Mapping[str, str],
        *,
        protocol_version: str | None = None,
        conversation_header: str = DEFAULT_CONVERSATION_HEADER,
    ) -> SessionKey:
        """The key for an MCP request.

        The revision is ``protocol_version`` if given, else the
        ``MCP-Protocol-Version`` header. Before 2026-07-28 an ``Mcp-Session-Id``
        header is used when present; in 2026-07-28 and later it is ignored (that
        revision has none). Then the ``conversation_header``; then the identity.
        """
        version = protocol_version or _header(headers, "mcp-protocol-version") or ""
        stateless = version >= STATELESS_MCP_REVISION
        if not stateless:
            session_id = _header(headers, "mcp-session-id")
            if session_id:
                return cls(identity.subject, identity.tenant, "mcp-session", session_id)
        conversation = _header(headers, conversation_header)
        if conversation:
            return cls(identity.subject, identity.tenant, "conversation", conversation)
        return cls.for_identity(identity)
