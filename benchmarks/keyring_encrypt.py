#!/usr/bin/env python3
"""In-process encrypt/decrypt cost: keygrants' keyring (and service) vs a raw AESGCM call.

    python benchmarks/keyring_encrypt.py
    python benchmarks/keyring_encrypt.py --size 1024 --repeats 15 --json out.json

Same 32-byte key, same plaintext, for every row:

  raw        ``AESGCM.encrypt(os.urandom(12), pt, None)`` / ``AESGCM.decrypt(nonce, ct, None)``
             (nonce generation is included on encrypt: any real use has to pay it)
  keyring    ``Keyring.encrypt(key_id, pt)`` / ``Keyring.decrypt(ct)`` -- native format: header
             build, key lookup, header parse, header as AAD
  service    ``KMS.encrypt(ctx, name, pt)`` / ``KMS.decrypt(ctx, ct)`` on a ``MemoryStore``
             (skipped with a note if that API is not importable)

Timing is timeit-style: each case is calibrated to ~``--batch-time`` seconds per batch, then
the batches of all cases are *interleaved* (raw, keyring, service, raw, keyring, ...) for
``--repeats`` rounds so drift on a shared machine hits every case alike. Reported: best and
median µs/op per case and each case's ratio to raw (best over best, median over median).
Target: keyring ≤ 2x raw. Exit status 1 if the keyring's best-case ratio misses that.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TARGET_RATIO = 2.0


def batch_time(fn: Callable[[], object], number: int) -> float:
    """Seconds for ``number`` calls, gc disabled (as timeit does)."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        rng = range(number)
        t0 = time.perf_counter()
        for _ in rng:
            fn()
        return time.perf_counter() - t0
    finally:
        if gc_was:
            gc.enable()


def calibrate(fn: Callable[[], object], target: float) -> int:
    """Smallest 1-2-5 loop count whose batch takes at least ``target`` seconds."""
    number = 1
    while True:
        for mult in (1, 2, 5):
            n = number * mult
            if batch_time(fn, n) >= target:
                return n
        number *= 10


def build_cases(size: int) -> tuple[dict[str, dict[str, Callable[[], object]]], list[str]]:
    """{op: {case: fn}} plus notes; every case checked for a correct round trip first."""
    from keygrants.keys import KeyMaterial, Keyring, KeyVersions, get_spec

    secret = os.urandom(32)
    data = os.urandom(size)
    notes: list[str] = []

    aead = AESGCM(secret)
    urandom = os.urandom
    nonce = urandom(12)
    raw_ct = aead.encrypt(nonce, data, None)
    assert aead.decrypt(nonce, raw_ct, None) == data

    km = KeyMaterial(get_spec("aes-256-gcm"), uuid.uuid4(), 1, secret)
    ring = Keyring()
    ring.put(KeyVersions(km.key_id, [km]))
    key_id = km.key_id
    ring_ct = ring.encrypt(key_id, data)
    assert ring.decrypt(ring_ct) == data, "keyring round trip failed"
    notes.append(f"sizes: raw ciphertext {len(raw_ct)} B (+12 B nonce kept aside), "
                 f"native ciphertext {len(ring_ct)} B")

    enc: dict[str, Callable[[], object]] = {
        "raw": lambda: aead.encrypt(urandom(12), data, None),
        "keyring": lambda: ring.encrypt(key_id, data),
    }
    dec: dict[str, Callable[[], object]] = {
        "raw": lambda: aead.decrypt(nonce, raw_ct, None),
        "keyring": lambda: ring.decrypt(ring_ct),
    }

    try:
        from keygrants.auth import RequestContext
        from keygrants.models import CreateKeyRequest
        from keygrants.service import KMS
        from keygrants.store.memory import MemoryStore

        kms = KMS(MemoryStore(), os.urandom(32))
        ctx = RequestContext(principal="admin")
        kms.create_key(ctx, CreateKeyRequest(name="b"))
        svc_ct = kms.encrypt(ctx, "b", data).ciphertext
        assert kms.decrypt(ctx, svc_ct).plaintext == data, "service round trip failed"
        enc["service"] = lambda: kms.encrypt(ctx, "b", data)
        dec["service"] = lambda: kms.decrypt(ctx, svc_ct)
    except Exception as exc:  # the service layer is optional for this benchmark
        notes.append(f"service row skipped: {type(exc).__name__}: {exc}")

    return {"encrypt": enc, "decrypt": dec}, notes


def measure(cases: dict[str, Callable[[], object]], repeats: int,
            target: float) -> dict[str, dict[str, Any]]:
    numbers = {name: calibrate(fn, target) for name, fn in cases.items()}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        # rotate the order each round so no case always runs first / after the same one
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(batch_time(cases[name], numbers[name]) / numbers[name] * 1e6)
    return {name: {"number": numbers[name], "best_us": min(s), "median_us": statistics.median(s),
                   "samples_us": s} for name, s in samples.items()}


def parse_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    """The options every micro-benchmark here takes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="plaintext bytes (1024)")
    p.add_argument("--repeats", type=int, default=11, help="interleaved rounds (11)")
    p.add_argument("--batch-time", type=float, default=0.1,
                   help="seconds per timed batch (0.1)")
    p.add_argument("--json", metavar="OUT", type=Path, help="write results as JSON")
    return p.parse_args(argv)


def run(cases: dict[str, dict[str, Callable[[], object]]], notes: list[str],
        args: argparse.Namespace, *, target_row: str, target_ratio: float) -> int:
    """Measure every operation's cases side by side, print the table and ratios to ``raw``,
    write ``--json``; exit status 1 if ``target_row`` misses ``target_ratio`` (best case)."""
    width = max(len(name) for op_cases in cases.values() for name in op_cases)
    op_width = max(len(op) for op in cases)
    print(f"machine: nproc={len(os.sched_getaffinity(0))}, python={sys.version.split()[0]}, "
          f"{platform.platform()}")
    print(f"{args.size} B plaintext, {args.repeats} interleaved repeats, "
          f"~{args.batch_time}s per batch")
    for note in notes:
        print(f"note: {note}")

    results: dict[str, dict[str, dict[str, Any]]] = {}
    failed = False
    for op, op_cases in cases.items():
        res = measure(op_cases, args.repeats, args.batch_time)
        results[op] = res
        raw = res["raw"]
        print(f"\n{op:<{op_width + 2}} {'best µs/op':>11} {'median µs/op':>13} {'best ratio':>11} "
              f"{'median ratio':>13}")
        for name, r in res.items():
            r["ratio_best"] = r["best_us"] / raw["best_us"]
            r["ratio_median"] = r["median_us"] / raw["median_us"]
            verdict = ""
            if name == target_row:
                ok = r["ratio_best"] <= target_ratio
                failed |= not ok
                verdict = f"  {'OK' if ok else 'OVER'} (target <= {target_ratio:g}x raw)"
            print(f"  {name:<{width}} {r['best_us']:>9.2f} {r['median_us']:>13.2f} "
                  f"{r['ratio_best']:>10.2f}x {r['ratio_median']:>12.2f}x{verdict}")

    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"nproc": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
                        "platform": platform.platform()},
            "config": {"size": args.size, "repeats": args.repeats,
                       "batch_time": args.batch_time},
            "notes": notes,
            "results": results,
        }, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__ or "", argv)
    try:
        cases, notes = build_cases(args.size)
    except ImportError as exc:
        print(f"error: cannot import keygrants ({exc}); run: pip install -e .", file=sys.stderr)
        return 1
    return run(cases, notes, args, target_row="keyring", target_ratio=TARGET_RATIO)


if __name__ == "__main__":
    sys.exit(main())
