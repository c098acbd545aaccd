"""The in-process session store: one bounded, expiring cache behind one lock."""

from __future__ import annotations

import builtins
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TLRUCache

from bastion.errors import StoreError
from bastion.session.store import WindowCount

__all__ = ["MemoryStore"]

_Value = bytes | int | deque[bytes] | frozenset[bytes]


@dataclass(frozen=True, slots=True)
class _Entry:
    value: _Value
    expires_at: float
    size: int = 0


def _until(key: str, entry: _Entry, now: float) -> float:
    return entry.expires_at


class MemoryStore:
    """A :class:`SessionStore` for one process (the default).

    Entries live in a cachetools ``TLRUCache`` (the per-item-TTL sibling of
    ``TTLCache``: taint, approvals and counters each need their own lifetime).
    Bounds: ``max_entries`` keys, and every TTL is cut to ``max_ttl`` seconds.
    When the store is full of live entries a write raises :class:`StoreError`
    instead of evicting one: evicting a taint mark or a counter would silently
    untaint a session or reset a limit, so the store fails closed instead.

    A ``threading.Lock`` guards every operation; no operation awaits while
    holding it, so it is safe from one event loop, several loops and threads.
    ``clock`` (Unix seconds) is injectable for tests.
    """

    # Holds nothing tied to an event loop: a sync transport may run the
    # pipeline over it on any thread's own loop (see Guard.loop_bound).
    loop_bound = False

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        max_ttl: float = 30 * 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1 or max_ttl <= 0:
            raise ValueError("max_entries and max_ttl must be positive")
        self._clock = clock
        self._max_ttl = max_ttl
        self._max_entries = max_entries
        self._cache: TLRUCache[str, _Entry] = TLRUCache(
            maxsize=max_entries, ttu=_until, timer=clock
        )
        self._lock = threading.Lock()

    def _expiry(self, ttl: float) -> float:
        if not ttl > 0 or math.isinf(ttl) or math.isnan(ttl):
            raise StoreError(f"a TTL must be a positive number of seconds, not {ttl!r}")
        return self._clock() + min(ttl, self._max_ttl)

    def _lookup(self, key: str) -> _Entry | None:
        return self._cache.get(key)

    def _store(self, key: str, entry: _Entry) -> None:
        if key not in self._cache and len(self._cache) >= self._max_entries:
            self._cache.expire()
            if len(self._cache) >= self._max_entries:
                raise StoreError(
                    f"memory session store is full ({self._max_entries} live entries); "
                    "refusing to evict live state"
                )
        self._cache[key] = entry

    @staticmethod
    def _kind_error(key: str, want: str) -> StoreError:
        return StoreError(f"session store key {key!r} does not hold a {want}")

    async def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._lookup(key)
            if entry is None:
                return None
            if not isinstance(entry.value, bytes):
                raise self._kind_error(key, "string value")
            return entry.value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        with self._lock:
            self._store(key, _Entry(bytes(value), self._expiry(ttl)))

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        with self._lock:
            if self._lookup(key) is not None:
                return False
            self._store(key, _Entry(bytes(value), self._expiry(ttl)))
            return True

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl: float | None = None
    ) -> bool:
        with self._lock:
            entry = self._lookup(key)
            if entry is None or entry.value != expected:
                return False
            expires = entry.expires_at if ttl is None else self._expiry(ttl)
            self._store(key, _Entry(bytes(value), expires))
            return True

    async def take(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._lookup(key)
            if entry is None:
                return None
            if not isinstance(entry.value, bytes):
                raise self._kind_error(key, "string value")
            self._cache.pop(key, None)
            return entry.value

    async def delete(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._cache.pop(key, None)

    async def incr_window(
        self, key: str, window: float, amount: int = 1, *, limit: int | None = None
    ) -> WindowCount:
        if not window > 0 or amount < 0:
            raise StoreError("a window must be positive and an amount not negative")
        with self._lock:
            now = self._clock()
            slot = math.floor(now / window)
            reset_at = (slot + 1) * window
            slot_key = f"{key}:{slot}"
            entry = self._lookup(slot_key)
            if entry is not None and not isinstance(entry.value, int):
                raise self._kind_error(slot_key, "counter")
            current = entry.value if entry is not None else 0
            assert isinstance(current, int)
            if amount == 0:
                return WindowCount(current, True, reset_at)
            if limit is not None and current + amount > limit:
                return WindowCount(current, False, reset_at)
            self._store(slot_key, _Entry(current + amount, reset_at))
            return WindowCount(current + amount, True, reset_at)

    async def append_bounded(self, key: str, item: bytes, max_bytes: int, ttl: float) -> None:
        if max_bytes < 1:
            raise StoreError("max_bytes must be positive")
        with self._lock:
            expires = self._expiry(ttl)
            entry = self._lookup(key)
            if entry is not None and not isinstance(entry.value, deque):
                raise self._kind_error(key, "list")
            items: deque[bytes] = deque(entry.value) if entry is not None else deque()  # type: ignore[arg-type]
            size = entry.size if entry is not None else 0
            piece = bytes(item[:max_bytes])
            items.append(piece)
            size += len(piece)
            while size > max_bytes and items:
                size -= len(items.popleft())
            self._store(key, _Entry(items, expires, size))

    async def list_items(self, key: str) -> list[bytes]:
        with self._lock:
            entry = self._lookup(key)
            if entry is None:
                return []
            if not isinstance(entry.value, deque):
                raise self._kind_error(key, "list")
            return list(entry.value)

    async def set_add(self, key: str, members: list[bytes], ttl: float) -> None:
        with self._lock:
            expires = self._expiry(ttl)
            entry = self._lookup(key)
            if entry is not None and not isinstance(entry.value, frozenset):
                raise self._kind_error(key, "set")
            current = entry.value if entry is not None else frozenset()
            assert isinstance(current, frozenset)
            if entry is not None:
                expires = max(expires, entry.expires_at)
            self._store(key, _Entry(current | frozenset(members), expires))

    async def set_remove(self, key: str, members: list[bytes]) -> None:
        with self._lock:
            entry = self._lookup(key)
            if entry is None:
                return
            if not isinstance(entry.value, frozenset):
                raise self._kind_error(key, "set")
            remaining = entry.value - frozenset(members)
            if remaining:
                self._store(key, _Entry(remaining, entry.expires_at))
            else:
                self._cache.pop(key, None)

    async def set_members(self, key: str) -> builtins.set[bytes]:
        with self._lock:
            entry = self._lookup(key)
            if entry is None:
                return set()
            if not isinstance(entry.value, frozenset):
                raise self._kind_error(key, "set")
            return set(entry.value)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
