"""Cost of identity resolution per request: a repeat (cached) JWT and a virtual key.

    python benchmarks/identity.py [--quick] [--json]

Goal: under 20 µs p50 for a repeat token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from bastion.identity import (
    IdentityConfig,
    IdentityResolver,
    IssuerConfig,
    KeyEntry,
    generate_secret,
    hash_secret,
)

ISSUER = "https://idp.bench"


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": round(statistics.median(ordered) * 1e6, 2),
        "p99_us": round(ordered[int(len(ordered) * 0.99) - 1] * 1e6, 2),
        "n": len(ordered),
    }


async def _measure(
    call: Callable[[Mapping[str, str]], Awaitable[Any]], headers: Mapping[str, str], n: int
) -> dict[str, float]:
    for _ in range(min(n, 1000)):
        await call(headers)
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        await call(headers)
        samples.append(clock() - start)
    return _percentiles(samples)


async def run(n: int) -> dict[str, Any]:
    private = rsa.generate_private_key(65537, 2048)
    jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update(kid="k1", alg="RS256", use="sig")
    key_id, secret = generate_secret()
    config = IdentityConfig(
        issuers=[
            IssuerConfig(
                issuer=ISSUER, jwks={"keys": [jwk]}, audiences=["bastion"], algorithms=["RS256"]
            )
        ],
        keys=[
            KeyEntry(
                id=key_id,
                hash=hash_secret(secret),
                subject="bench-bot",
                groups=["eng"],
                providers=["openai"],
                models=["gpt-*"],
            )
        ],
    )
    resolver = IdentityResolver(config)
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": ISSUER,
            "aud": "bastion",
            "sub": "alice",
            "groups": ["eng"],
            "iat": now,
            "exp": now + 3600,
        },
        private,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    first_start = time.perf_counter()
    await resolver.resolve({"authorization": f"Bearer {token}"})
    first_verify = time.perf_counter() - first_start
    results = {
        "jwt_repeat": await _measure(resolver.resolve, {"authorization": f"Bearer {token}"}, n),
        "virtual_key": await _measure(resolver.resolve, {"x-api-key": secret}, n),
        "jwt_first_verify_us": round(first_verify * 1e6, 1),
        "goal_jwt_repeat_p50_us": 20,
    }
    await resolver.aclose()
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    results = asyncio.run(run(5_000 if args.quick else 50_000))
    if args.json:
        print(json.dumps(results))
    else:
        for name in ("jwt_repeat", "virtual_key"):
            row = results[name]
            print(
                f"{name:<12} p50 {row['p50_us']:>7.2f} µs   p99 {row['p99_us']:>7.2f} µs   n={row['n']}"
            )
        print(f"first JWT verification (RS256): {results['jwt_first_verify_us']} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
