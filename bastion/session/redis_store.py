"""The shared session store: Redis through redis-py's asyncio client (extra ``[redis]``)."""

from __future__ import annotations

import asyncio
import builtins
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from bastion.errors import StoreError
from bastion.session.store import WindowCount

__all__ = ["RedisStore"]

T = TypeVar("T")

# Every multi-step operation is one Lua script, so it is atomic on the server
# whichever Bastion process runs it.
_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
end
return 1
"""

_INCR_WINDOW = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if amount == 0 then return {current, 1} end
if limit >= 0 and current + amount > limit then return {current, 0} end
local total = redis.call('INCRBY', KEYS[1], amount)
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {total, 1}
"""

_APPEND_BOUNDED = """
local item = ARGV[1]
local max_bytes = tonumber(ARGV[2])
if #item > max_bytes then item = string.sub(item, 1, max_bytes) end
redis.call('RPUSH', KEYS[1], item)
local total = redis.call('INCRBY', KEYS[2], #item)
while total > max_bytes do
  local oldest = redis.call('LPOP', KEYS[1])
  if not oldest then break end
  total = redis.call('DECRBY', KEYS[2], #oldest)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return total
"""

_SET_ADD = """
redis.call('SADD', KEYS[1], unpack(ARGV, 2))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""


def _import_redis() -> Any:
    try:
        import redis.asyncio as redis_asyncio
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "the Redis session store needs redis-py: pip install 'bastion-guard[redis]'"
        ) from exc
    return redis_asyncio


def _millis(ttl: float) -> int:
    if not ttl > 0 or math.isinf(ttl) or math.isnan(ttl):
        raise StoreError(f"a TTL must be a positive number of seconds, not {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


class RedisStore:
    """A :class:`SessionStore` in Redis, shared by every Bastion process that uses it.

    ``url`` is a redis-py URL (``redis://host:6379/0``, ``rediss://``,
    ``unix://``); ``prefix`` namespaces every key. Each operation has a deadline
    of ``timeout`` seconds (connect and socket timeouts too) and redis-py's own
    retries are off, so an unreachable server fails fast. Any failure -
    unreachable, timeout, an error reply, data of the wrong kind - raises
    :class:`StoreError`; nothing is ever read as "no state".

    Run Redis with ``maxmemory-policy noeviction``: an evicting policy would
    silently drop taint marks and counters, while ``noeviction`` turns memory
    pressure into write errors, which Bastion treats as a denial. Fixed windows
    use this process's clock; keep the hosts' clocks in sync (NTP).

    ``client`` may be a ready ``redis.asyncio.Redis`` (then ``url`` is ignored
    and the caller owns it). Like redis-py's asyncio client, a store belongs to
    the event loop that first uses it.
    """

    # redis-py's asyncio pool belongs to the loop that first used it.
    loop_bound = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "bastion:",
        timeout: float = 2.0,
        client: Any | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        redis_asyncio = _import_redis()
        self._prefix = prefix
        self._timeout = timeout
        self._clock = clock
        self._owns_client = client is None
        if client is None:
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # No client-side retries: a retried script could count twice.

            client = redis_asyncio.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
        self._client = client
        self._url = url if self._owns_client else "<client>"
        self._cas = client.register_script(_COMPARE_AND_SET)
        self._incr = client.register_script(_INCR_WINDOW)
        self._append = client.register_script(_APPEND_BOUNDED)
        self._sadd = client.register_script(_SET_ADD)

    def _k(self, key: str) -> str:
        return self._prefix + key

    async def _run(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        import redis.exceptions as redis_errors

        try:
            async with asyncio.timeout(self._timeout):
                return await call()
        except StoreError:
            raise
        except TimeoutError as exc:
            raise StoreError(
                f"Redis session store at {self._url} timed out after {self._timeout}s ({what})"
            ) from exc
        except redis_errors.ResponseError as exc:
            raise StoreError(f"Redis session store refused {what}: {exc}") from exc
        except (redis_errors.RedisError, OSError) as exc:
            raise StoreError(
                f"Redis session store at {self._url} is unreachable ({what}): {exc}"
            ) from exc

    async def get(self, key: str) -> bytes | None:
        value = await self._run("GET", lambda: self._client.get(self._k(key)))
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        ms = _millis(ttl)
        await self._run("SET", lambda: self._client.set(self._k(key), value, px=ms))

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        ms = _millis(ttl)
        done = await self._run(
            "SET NX", lambda: self._client.set(self._k(key), value, px=ms, nx=True)
        )
        return bool(done)

    async def compare_and_set(
        self, key: str, expected: bytes, value: bytes, ttl: float | None = None
    ) -> bool:
        ms = 0 if ttl is None else _millis(ttl)
        done = await self._run(
            "compare-and-set", lambda: self._cas(keys=[self._k(key)], args=[expected, value, ms])
        )
        return int(done) == 1

    async def take(self, key: str) -> bytes | None:
        value = await self._run("GETDEL", lambda: self._client.getdel(self._k(key)))
        return None if value is None else bytes(value)

    async def delete(self, *keys: str) -> None:
        if not keys:
            return
        names = [name for k in keys for name in (self._k(k), *self._list_keys(k))]
        await self._run("DEL", lambda: self._client.delete(*names))

    async def incr_window(
        self, key: str, window: float, amount: int = 1, *, limit: int | None = None
    ) -> WindowCount:
        if not window > 0 or amount < 0:
            raise StoreError("a window must be positive and an amount not negative")
        now = self._clock()
        slot = math.floor(now / window)
        reset_at = (slot + 1) * window
        # A little past the window's end, so a straggling increment cannot
        # recreate the key without an expiry.
        ttl_ms = _millis(reset_at - now + 1.0)
        slot_key = self._k(f"{key}:{slot}")
        reply = await self._run(
            "window increment",
            lambda: self._incr(
                keys=[slot_key], args=[amount, -1 if limit is None else limit, ttl_ms]
            ),
        )
        try:
            count, applied = int(reply[0]), int(reply[1]) == 1
        except (TypeError, ValueError, IndexError) as exc:
            raise StoreError(f"Redis session store returned a bad counter: {reply!r}") from exc
        return WindowCount(count, applied, reset_at)

    def _list_keys(self, key: str) -> tuple[str, str]:
        # One hash tag for the list and its byte count keeps them in one slot
        # (Redis Cluster), so the script may touch both.
        base = f"{self._prefix}{{{key}}}"
        return base + ":items", base + ":bytes"

    async def append_bounded(self, key: str, item: bytes, max_bytes: int, ttl: float) -> None:
        if max_bytes < 1:
            raise StoreError("max_bytes must be positive")
        ms = _millis(ttl)
        items, size = self._list_keys(key)
        await self._run(
            "bounded append",
            lambda: self._append(keys=[items, size], args=[item, max_bytes, ms]),
        )

    async def list_items(self, key: str) -> list[bytes]:
        items, _ = self._list_keys(key)
        values = await self._run("LRANGE", lambda: self._client.lrange(items, 0, -1))
        return [bytes(v) for v in values]

    async def set_add(self, key: str, members: list[bytes], ttl: float) -> None:
        ms = _millis(ttl)
        if not members:
            return
        await self._run("SADD", lambda: self._sadd(keys=[self._k(key)], args=[ms, *members]))

    async def set_remove(self, key: str, members: list[bytes]) -> None:
        if not members:
            return
        await self._run("SREM", lambda: self._client.srem(self._k(key), *members))

    async def set_members(self, key: str) -> builtins.set[bytes]:
        values = await self._run("SMEMBERS", lambda: self._client.smembers(self._k(key)))
        return {bytes(v) for v in values}

    async def ping(self) -> None:
        await self._run("PING", lambda: self._client.ping())

    async def aclose(self) -> None:
        if self._owns_client:
            await self._run("close", lambda: self._client.aclose())
