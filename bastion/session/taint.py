"""MCP session taint: which tools tainted a session, and the untrusted text they returned."""

from __future__ import annotations

from dataclasses import dataclass

from bastion.errors import StoreError
from bastion.events import Context
from bastion.session.keys import SessionKey
from bastion.session.store import SessionStore

__all__ = ["TaintState", "TaintTracker"]


@dataclass(frozen=True, slots=True)
class TaintState:
    """A session's taint: the tools that tainted it and the newest untrusted texts."""

    tainted: bool = False
    sources: frozenset[str] = frozenset()
    untrusted_texts: tuple[str, ...] = ()

    def apply(self, context: Context) -> Context:
        """``context`` with this state's taint and untrusted texts added to its own."""
        if not self.tainted:
            return context
        return Context(
            tainted=True,
            taint_sources=context.taint_sources | self.sources,
            session=context.session,
            turn=context.turn,
            user_texts=context.user_texts,
            trusted_texts=context.trusted_texts,
            untrusted_texts=context.untrusted_texts + self.untrusted_texts,
            attributes=context.attributes,
        )


def _cut_utf8(data: bytes, limit: int) -> bytes:
    if len(data) <= limit:
        return data
    # Cut on a character boundary so the kept head still decodes.
    return data[:limit].decode("utf-8", errors="ignore").encode("utf-8")


class TaintTracker:
    """Taint per :class:`SessionKey`, kept in a :class:`SessionStore`.

    A session stays tainted for ``ttl`` seconds after its latest mark (each
    mark refreshes it). Untrusted texts are kept for argument provenance, at
    most ``max_text_bytes`` (UTF-8) per session: the newest are kept and the
    oldest dropped, and a single text longer than the bound keeps its head.
    Dropping old text only weakens ``from untrusted`` matches against it; the
    session's taint and sources are never dropped before the TTL.
    """

    def __init__(
        self,
        store: SessionStore,
        *,
        ttl: float = 24 * 3600,
        max_text_bytes: int = 256 * 1024,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._max_text_bytes = max_text_bytes

    @staticmethod
    def _keys(key: SessionKey) -> tuple[str, str]:
        return f"taint:{key.id}:sources", f"taint:{key.id}:texts"

    async def mark_tainted(
        self, key: SessionKey, source_tool: str, text: str | None = None
    ) -> None:
        """Mark the session tainted by ``source_tool``, keeping ``text`` if given."""
        sources, texts = self._keys(key)
        # Sources first: if the text write then fails, the session is already
        # tainted and the caller sees a StoreError.
        await self._store.set_add(sources, [source_tool.encode("utf-8")], self._ttl)
        if text:
            data = _cut_utf8(text.encode("utf-8"), self._max_text_bytes)
            await self._store.append_bounded(texts, data, self._max_text_bytes, self._ttl)

    async def get_taint(self, key: SessionKey) -> TaintState:
        """The session's taint (untainted when nothing was ever marked or it expired)."""
        sources_key, texts_key = self._keys(key)
        raw_sources = await self._store.set_members(sources_key)
        raw_texts = await self._store.list_items(texts_key) if raw_sources else []
        try:
            sources = frozenset(s.decode("utf-8") for s in raw_sources)
        except UnicodeDecodeError as exc:
            raise StoreError("session store holds a taint source that is not UTF-8") from exc
        texts = tuple(t.decode("utf-8", errors="replace") for t in raw_texts)
        return TaintState(bool(sources), sources, texts)

    async def clear(self, key: SessionKey) -> None:
        """Forget the session's taint (e.g. when the MCP session is deleted)."""
        await self._store.delete(*self._keys(key))
