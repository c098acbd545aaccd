"""Rate and budget limits: atomic fixed-window counters per identity and bucket."""

from __future__ import annotations

from dataclasses import dataclass

from bastion.events import Identity
from bastion.session.keys import digest
from bastion.session.store import SessionStore

__all__ = ["LimitStatus", "RateLimiter"]


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """The outcome of a limit check: whether it passed, what is left, when it resets."""

    allowed: bool
    count: int
    limit: int
    remaining: int
    reset_at: float


class RateLimiter:
    """Counters per (identity, bucket, window) in a :class:`SessionStore`.

    A bucket is whatever the policy counts: a tool name, a tool set's name,
    ``tokens:<model>`` for a token budget. Windows are fixed and aligned to
    multiples of ``window`` seconds since the epoch, so every process agrees on
    them; a burst can reach twice the limit across a window boundary (the price
    of one atomic counter instead of a log per call).

    :meth:`check_and_count` is atomic check-then-add: a refused call adds
    nothing, so attempts over the limit do not eat into the next caller's
    allowance. For token budgets, where the cost is known only after the
    response, use :meth:`check` before and :meth:`add` after.
    """

    def __init__(self, store: SessionStore) -> None:
        self._store = store

    @staticmethod
    def _key(identity: Identity, bucket: str, window: float) -> str:
        return f"limit:{digest('limit', identity.tenant, identity.subject, bucket, window)}"

    async def check_and_count(
        self, identity: Identity, bucket: str, limit: int, window: float, amount: int = 1
    ) -> LimitStatus:
        """Count ``amount`` if the window's total stays within ``limit``."""
        result = await self._store.incr_window(
            self._key(identity, bucket, window), window, amount, limit=limit
        )
        return LimitStatus(
            allowed=result.applied,
            count=result.total,
            limit=limit,
            remaining=max(0, limit - result.total),
            reset_at=result.reset_at,
        )

    async def check(
        self, identity: Identity, bucket: str, limit: int, window: float
    ) -> LimitStatus:
        """Whether the window still has room (under ``limit``), without counting."""
        result = await self._store.incr_window(self._key(identity, bucket, window), window, 0)
        return LimitStatus(
            allowed=result.total < limit,
            count=result.total,
            limit=limit,
            remaining=max(0, limit - result.total),
            reset_at=result.reset_at,
        )

    async def add(self, identity: Identity, bucket: str, window: float, amount: int) -> int:
        """Count ``amount`` unconditionally (e.g. tokens used); returns the window's total."""
        result = await self._store.incr_window(self._key(identity, bucket, window), window, amount)
        return result.total
