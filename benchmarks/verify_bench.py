#!/usr/bin/env python3
"""Local grant-token verification cost, side by side in one run (issue #6):

    python benchmarks/verify_bench.py [--repeats 9] [--number 5000]

On the same token (issued by an in-process KMS: Ed25519, ``kg+jwt``):

  raw ed25519   PyNaCl (libsodium) ``VerifyKey.verify`` of the token's signing input: the
                floor, the fastest binding installed
  raw pyca      pyca/cryptography ``Ed25519PublicKey.verify`` of the same (for scale)
  first sight   ``keygrants.Verifier.verify`` of a token it has not seen (its cache cleared each
                call): parsing, header checks, signature, claims, revocation view, operation
  cached        ``Verifier.verify`` of a token seen before (the steady state of a service)
  pyjwt         PyJWT ``jwt.decode`` of the same token with the same key, issuer and audience

Targets: first sight <= 1.3x raw ed25519; cached <= 5 us; first sight at least 2x faster than
PyJWT. Reported: best and median us/op over ``--repeats`` interleaved rounds, and the ratios.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
import timeit
import warnings
from collections.abc import Callable
from typing import Any

import httpx


def build() -> tuple[str, dict[str, Any], dict[str, Any], str]:
    """An in-process KMS, a grant token, the JWKS and the (empty) revocation feed."""
    from keygrants.auth import RequestContext
    from keygrants.auth.model import Principal
    from keygrants.grant_service import GrantService
    from keygrants.models import CreateGrantRequest, CreateKeyRequest
    from keygrants.service import KMS
    from keygrants.store.memory import MemoryStore

    store = MemoryStore()
    root = os.urandom(32)
    kms = KMS(store, root)
    admin = RequestContext(principal="admin", request_id="bench")
    kms.create_key(admin, CreateKeyRequest(name="bench"))
    store.create_principal(Principal(id="svc", created_at=0, updated_at=0))
    grants = GrantService(kms, None, root_key=root)
    created = grants.create(admin, CreateGrantRequest(
        key="bench", grantee="svc", operations=["decrypt"], ttl=3600, audiences=["svc-ledger"],
        context_subset={"tenant": "42"}))
    assert created.token is not None
    feed = {"entries": [], "latest": 0, "more": False}
    return created.token, grants.jwks(), feed, grants.issuer


def timed(fn: Callable[[], object], number: int) -> float:
    return timeit.timeit(fn, number=number) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--number", type=int, default=5000)
    args = p.parse_args(argv)

    import jwt
    import nacl.signing
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from keygrants import Verifier

    token, jwks, feed, issuer = build()

    def serve(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/jwks.json":
            return httpx.Response(200, json=jwks, headers={"cache-control": "max-age=300"})
        return httpx.Response(200, json=feed)

    verifier = Verifier("http://kms", audience="svc-ledger", max_staleness=3600,
                        transport=httpx.MockTransport(serve))
    context = {"tenant": "42"}
    verifier.verify(token, operation="decrypt", context=context)  # fetch keys and feed once
    cache = verifier._state.verified

    head, claims, sig = token.split(".")
    signing_input = f"{head}.{claims}".encode()
    signature = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    x = base64.urlsafe_b64decode(jwks["keys"][0]["x"] + "==")
    nacl_key = nacl.signing.VerifyKey(x)
    pyca_key = ed25519.Ed25519PublicKey.from_public_bytes(x)
    jwt_key = jwt.PyJWK(jwks["keys"][0])

    def first_sight() -> object:
        cache.clear()
        return verifier.verify(token, operation="decrypt", context=context)

    cases: dict[str, Callable[[], object]] = {
        "raw ed25519": lambda: nacl_key.verify(signing_input, signature),
        "raw pyca": lambda: pyca_key.verify(signature, signing_input),
        "first sight": first_sight,
        "cached": lambda: verifier.verify(token, operation="decrypt", context=context),
        "pyjwt": lambda: jwt.decode(token, jwt_key, algorithms=["EdDSA"], audience="svc-ledger",
                                    issuer=issuer),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in cases.values():  # every case works before it is timed
            fn()
        samples: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                samples[name].append(timed(cases[name], args.number))

    best = {n: min(v) for n, v in samples.items()}
    median = {n: statistics.median(v) for n, v in samples.items()}
    print(f"python {sys.version.split()[0]}, {args.repeats} interleaved rounds of "
          f"{args.number} calls, token {len(token)} bytes")
    print(f"{'case':14} {'best us':>9} {'median us':>10}")
    for n in cases:
        print(f"{n:14} {best[n]:9.2f} {median[n]:10.2f}")
    first_ratio = best["first sight"] / best["raw ed25519"]
    pyjwt_speedup = best["pyjwt"] / best["first sight"]
    ok = [first_ratio <= 1.3, best["cached"] <= 5.0, pyjwt_speedup >= 2.0]
    print(f"first sight / raw ed25519: {first_ratio:.2f}x   target <= 1.3x: "
          f"{'PASS' if ok[0] else 'MISS'}")
    print(f"cached: {best['cached']:.2f} us                target <= 5 us: "
          f"{'PASS' if ok[1] else 'MISS'}")
    print(f"pyjwt / first sight: {pyjwt_speedup:.2f}x        target >= 2x: "
          f"{'PASS' if ok[2] else 'MISS'}")
    print(json.dumps({"best_us": best, "median_us": median, "time": time.time()}))
    verifier.close()
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
