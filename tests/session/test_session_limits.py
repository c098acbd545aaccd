"""Rate and budget limits on atomic window counters."""

from __future__ import annotations

import asyncio

from bastion.events import Identity
from bastion.session import RateLimiter

from .conftest import Backend

ALICE = Identity(subject="alice")
BOB = Identity(subject="bob")


async def test_calls_pass_up_to_the_limit_then_are_refused(backend: Backend) -> None:
    limiter = RateLimiter(backend.store)
    statuses = [await limiter.check_and_count(ALICE, "github__*", 3, 60) for _ in range(4)]
    assert [s.allowed for s in statuses] == [True, True, True, False]
    assert [s.remaining for s in statuses] == [2, 1, 0, 0]
    assert statuses[-1].reset_at > backend.clock.now
    assert statuses[-1].reset_at - backend.clock.now <= 60


async def test_a_refused_amount_is_not_counted(backend: Backend) -> None:
    limiter = RateLimiter(backend.store)
    await limiter.check_and_count(ALICE, "tokens", 100, 60, amount=80)
    refused = await limiter.check_and_count(ALICE, "tokens", 100, 60, amount=30)
    assert not refused.allowed and refused.count == 80
    assert (await limiter.check_and_count(ALICE, "tokens", 100, 60, amount=20)).allowed


async def test_identities_and_buckets_are_counted_apart(backend: Backend) -> None:
    limiter = RateLimiter(backend.store)
    assert (await limiter.check_and_count(ALICE, "a", 1, 60)).allowed
    assert (await limiter.check_and_count(BOB, "a", 1, 60)).allowed
    assert (await limiter.check_and_count(ALICE, "b", 1, 60)).allowed
    assert not (await limiter.check_and_count(ALICE, "a", 1, 60)).allowed


async def test_the_limit_resets_in_the_next_window(backend: Backend) -> None:
    limiter = RateLimiter(backend.store)
    assert (await limiter.check_and_count(ALICE, "t", 1, 60)).allowed
    assert not (await limiter.check_and_count(ALICE, "t", 1, 60)).allowed
    backend.advance_clock(60)
    assert (await limiter.check_and_count(ALICE, "t", 1, 60)).allowed


async def test_a_token_budget_is_checked_before_and_counted_after(backend: Backend) -> None:
    limiter = RateLimiter(backend.store)
    assert (await limiter.check(ALICE, "tokens:gpt", 1000, 3600)).allowed
    assert await limiter.add(ALICE, "tokens:gpt", 3600, 700) == 700
    assert await limiter.add(ALICE, "tokens:gpt", 3600, 400) == 1100
    status = await limiter.check(ALICE, "tokens:gpt", 1000, 3600)
    assert not status.allowed and status.remaining == 0 and status.count == 1100


async def test_concurrent_calls_cannot_overshoot_the_limit(backend: Backend) -> None:
    limiter = RateLimiter(backend.store)
    statuses = await asyncio.gather(
        *(limiter.check_and_count(ALICE, "burst", 5, 60) for _ in range(25))
    )
    assert sum(s.allowed for s in statuses) == 5
