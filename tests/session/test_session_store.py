"""The store primitives, the same behaviour from MemoryStore and RedisStore."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from bastion.errors import StoreError
from bastion.session import MemoryStore, RedisStore, open_store

from .conftest import Backend, FakeClock


async def test_get_of_a_missing_key_is_none(backend: Backend) -> None:
    assert await backend.store.get("nothing") is None


async def test_set_then_get_returns_the_bytes(backend: Backend) -> None:
    await backend.store.set("k", b"\x00value\xff", 60)
    assert await backend.store.get("k") == b"\x00value\xff"


async def test_add_stores_only_when_absent(backend: Backend) -> None:
    assert await backend.store.add("k", b"first", 60) is True
    assert await backend.store.add("k", b"second", 60) is False
    assert await backend.store.get("k") == b"first"


async def test_compare_and_set_replaces_only_the_expected_value(backend: Backend) -> None:
    await backend.store.set("k", b"a", 60)
    assert await backend.store.compare_and_set("k", b"b", b"c") is False
    assert await backend.store.get("k") == b"a"
    assert await backend.store.compare_and_set("k", b"a", b"c") is True
    assert await backend.store.get("k") == b"c"
    assert await backend.store.compare_and_set("missing", b"a", b"c") is False
    assert await backend.store.get("missing") is None


async def test_take_returns_the_value_once(backend: Backend) -> None:
    await backend.store.set("k", b"v", 60)
    assert await backend.store.take("k") == b"v"
    assert await backend.store.take("k") is None
    assert await backend.store.get("k") is None


async def test_concurrent_takes_give_the_value_to_exactly_one(backend: Backend) -> None:
    await backend.store.set("k", b"v", 60)
    results = await asyncio.gather(*(backend.store.take("k") for _ in range(20)))
    assert results.count(b"v") == 1
    assert results.count(None) == 19


async def test_values_expire_after_their_ttl(backend: Backend) -> None:
    await backend.store.set("short", b"v", 0.3)
    await backend.store.set("long", b"v", 60)
    await backend.advance(0.45)
    assert await backend.store.get("short") is None
    assert await backend.store.get("long") == b"v"


async def test_compare_and_set_without_ttl_keeps_the_remaining_ttl(backend: Backend) -> None:
    await backend.store.set("k", b"a", 0.3)
    assert await backend.store.compare_and_set("k", b"a", b"b") is True
    await backend.advance(0.45)
    assert await backend.store.get("k") is None


async def test_delete_removes_keys_of_every_kind(backend: Backend) -> None:
    await backend.store.set("s", b"v", 60)
    await backend.store.set_add("set", [b"m"], 60)
    await backend.store.append_bounded("list", b"item", 100, 60)
    await backend.store.delete("s", "set", "list", "absent")
    assert await backend.store.get("s") is None
    assert await backend.store.set_members("set") == set()
    assert await backend.store.list_items("list") == []


async def test_incr_window_counts_within_the_window(backend: Backend) -> None:
    first = await backend.store.incr_window("c", 60, 2)
    second = await backend.store.incr_window("c", 60, 3)
    assert (first.total, second.total) == (2, 5)
    assert first.applied and second.applied
    assert second.reset_at > backend.clock.now
    assert second.reset_at % 60 == 0


async def test_incr_window_with_limit_refuses_without_counting(backend: Backend) -> None:
    await backend.store.incr_window("c", 60, 8, limit=10)
    refused = await backend.store.incr_window("c", 60, 5, limit=10)
    assert (refused.total, refused.applied) == (8, False)
    fits = await backend.store.incr_window("c", 60, 2, limit=10)
    assert (fits.total, fits.applied) == (10, True)


async def test_incr_window_by_zero_reads_without_creating(backend: Backend) -> None:
    assert (await backend.store.incr_window("c", 60, 0)).total == 0
    await backend.store.incr_window("c", 60, 4)
    assert (await backend.store.incr_window("c", 60, 0)).total == 4


async def test_a_new_window_starts_from_zero(backend: Backend) -> None:
    await backend.store.incr_window("c", 60, 3)
    backend.advance_clock(60)
    assert (await backend.store.incr_window("c", 60, 1)).total == 1


async def test_concurrent_increments_with_limit_apply_exactly_up_to_it(backend: Backend) -> None:
    results = await asyncio.gather(
        *(backend.store.incr_window("c", 60, 1, limit=5) for _ in range(20))
    )
    assert sum(r.applied for r in results) == 5
    assert (await backend.store.incr_window("c", 60, 0)).total == 5


async def test_append_bounded_keeps_the_newest_items_within_the_bound(backend: Backend) -> None:
    for item in (b"aaaa", b"bbbb", b"cccc", b"dd"):
        await backend.store.append_bounded("l", item, 9, 60)
    assert await backend.store.list_items("l") == [b"cccc", b"dd"]


async def test_append_bounded_cuts_an_oversized_item_to_the_bound(backend: Backend) -> None:
    await backend.store.append_bounded("l", b"0123456789", 4, 60)
    assert await backend.store.list_items("l") == [b"0123"]


async def test_sets_add_remove_and_list_members(backend: Backend) -> None:
    await backend.store.set_add("s", [b"a", b"b"], 60)
    await backend.store.set_add("s", [b"b", b"c"], 60)
    await backend.store.set_remove("s", [b"a"])
    assert await backend.store.set_members("s") == {b"b", b"c"}


async def test_using_a_key_as_the_wrong_kind_is_a_store_error(backend: Backend) -> None:
    await backend.store.set_add("s", [b"a"], 60)
    with pytest.raises(StoreError):
        await backend.store.get("s")
    with pytest.raises(StoreError):
        await backend.store.take("s")


async def test_a_non_positive_ttl_is_a_store_error(backend: Backend) -> None:
    with pytest.raises(StoreError):
        await backend.store.set("k", b"v", 0)


async def test_a_full_memory_store_refuses_writes_instead_of_evicting_live_state() -> None:
    store = MemoryStore(max_entries=2)
    await store.set_add("taint", [b"web"], 60)
    await store.set("b", b"v", 60)
    with pytest.raises(StoreError, match="full"):
        await store.set("c", b"v", 60)
    assert await store.set_members("taint") == {b"web"}
    await store.set("b", b"replaced", 60)  # overwriting a live key still works
    assert await store.get("b") == b"replaced"


async def test_a_full_memory_store_accepts_writes_again_once_entries_expire() -> None:
    clock = FakeClock()
    store = MemoryStore(max_entries=1, clock=clock)
    await store.set("a", b"v", 1)
    clock.now += 2
    await store.set("b", b"v", 60)
    assert await store.get("b") == b"v"


async def test_memory_store_cuts_ttls_to_its_maximum() -> None:
    clock = FakeClock()
    store = MemoryStore(max_ttl=10, clock=clock)
    await store.set("k", b"v", 3600)
    clock.now += 11
    assert await store.get("k") is None


def test_open_store_picks_the_backend_from_the_url() -> None:
    assert isinstance(open_store(None), MemoryStore)
    assert isinstance(open_store("memory://"), MemoryStore)
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)
    with pytest.raises(ValueError, match="unknown session store URL"):
        open_store("postgres://db")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def test_importing_the_session_package_does_not_import_redis() -> None:
    result = run_python("import sys, bastion.session; print('redis' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_redis_store_without_redis_py_names_the_extra_to_install() -> None:
    result = run_python(
        "import sys; sys.modules['redis'] = None; sys.modules['redis.asyncio'] = None\n"
        "from bastion.session import RedisStore\n"
        "try:\n"
        "    RedisStore('redis://127.0.0.1:1/0')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'bastion-guard[redis]'" in result.stdout


async def test_set_add_never_shortens_the_sets_ttl(backend: Backend) -> None:
    await backend.store.set_add("s", [b"a"], 60)
    await backend.store.set_add("s", [b"b"], 0.3)
    await backend.advance(0.45)
    assert await backend.store.set_members("s") == {b"a", b"b"}
