"""The session store interface: a few atomic primitives every stateful service is built on.

The services (taint, approvals, limits, pins) are written once against this
interface; a backend only has to make each primitive atomic. Keys are plain
strings chosen by the services; a backend may prefix them. Every method raises
:class:`bastion.errors.StoreError` when the backend fails, never a default value.
"""

from __future__ import annotations

import builtins
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["SessionStore", "WindowCount", "open_store"]


class WindowCount(NamedTuple):
    """A fixed-window counter after an increment (or a peek).

    ``total`` is the window's total after the operation, ``applied`` is false when
    a ``limit`` refused the increment (the total is then unchanged), ``reset_at``
    is the Unix time the window ends.
    """

    total: int
    applied: bool
    reset_at: float


@runtime_checkable
class SessionStore(Protocol):
    """Atomic primitives over expiring keys. Every write takes a TTL in seconds.

    Values are bytes. Lists, sets and counters live under their own keys; using a
    key with the wrong kind of operation is a :class:`StoreError`, as in Redis.
    """

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None when absent or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds, replacing any value."""
        ...

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        """Store ``value`` only if ``key`` is absent; true when it was stored."""
        ...

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl: float | None = None
    ) -> bool:
        """Replace the value only if it is exactly ``expected``; true when replaced.

        ``ttl`` None keeps the key's remaining time to live.
        """
        ...

    async def take(self, key: str) -> bytes | None:
        """Atomically return and delete the value: of concurrent takers, one gets it."""
        ...

    async def delete(self, *keys: str) -> None:
        """Delete keys of any kind; absent keys are ignored."""
        ...

    async def incr_window(
        self, key: str, window: float, amount: int = 1, *, limit: int | None = None
    ) -> WindowCount:
        """Add ``amount`` to the counter of the current fixed window of ``key``.

        Windows are aligned to multiples of ``window`` seconds since the epoch.
        With ``limit``, the increment is applied only if the total stays within
        it. ``amount`` 0 reads the counter without creating it.
        """
        ...

    async def append_bounded(self, key: str, item: bytes, max_bytes: int, ttl: float) -> None:
        """Append ``item`` to the list at ``key``, dropping the oldest items while
        the list holds more than ``max_bytes``; an item larger than the bound is
        cut to it. Refreshes the TTL."""
        ...

    async def list_items(self, key: str) -> list[bytes]:
        """The list at ``key``, oldest first (empty when absent)."""
        ...

    async def set_add(self, key: str, members: list[bytes], ttl: float) -> None:
        """Add members to the set at ``key``; its TTL becomes at least ``ttl`` (never shorter)."""
        ...

    async def set_remove(self, key: str, members: list[bytes]) -> None:
        """Remove members from the set at ``key``."""
        ...

    async def set_members(self, key: str) -> builtins.set[bytes]:
        """The members of the set at ``key`` (empty when absent)."""
        ...

    async def ping(self) -> None:
        """Check the backend answers; raise :class:`StoreError` otherwise."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def open_store(url: str | None = None, **options: object) -> SessionStore:
    """A store for a URL: None or ``memory://`` for :class:`MemoryStore`,
    ``redis://``, ``rediss://`` or ``unix://`` for :class:`RedisStore`.

    ``options`` go to the store's constructor.
    """
    if url is None or url == "memory://" or url == "memory":
        from bastion.session.memory import MemoryStore

        return MemoryStore(**options)  # type: ignore[arg-type]
    if url.startswith(("redis://", "rediss://", "unix://")):
        from bastion.session.redis_store import RedisStore

        return RedisStore(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown session store URL {url!r}: use memory:// or redis://host:port/db")
