#!/usr/bin/env python3
"""Policy decisions per second: ``PolicyEngine.decide`` vs calling cedarpy directly.

    python benchmarks/policy_decisions.py
    python benchmarks/policy_decisions.py --policies 50 --principals 1000 --repeats 11 --json out.json

One policy set (``--policies`` named policies, ~2 statements each: team permits, per-service
permits, forbids, a business-hours rule, grant limits, an auditor) and one stream of requests
from ``--principals`` principals over ``--keys`` keys, the same for every row:

  engine spread      ``PolicyEngine.decide`` over 16384 distinct requests (principal, key,
                     action, context), cycled: 4x the entity cache (4096 handles), so every
                     decision parses its entities (the worst case)
  engine hot         the same over the first 64 requests: the steady state of services that
                     use a few keys
  cedarpy floor      ``cedarpy.is_authorized`` with the whole set pre-parsed (``PolicySet``),
                     an ``Entities`` handle per request built beforehand (outside the timing,
                     for the first 2048 requests) and the full context: what a caller that
                     caches every parse but evaluates every statement pays per decision
  cedarpy re-parse   ``cedarpy.is_authorized`` with the policy text and an entities JSON string
                     per call (schema as a pre-parsed handle, so it adds the action groups):
                     the reference the engine replaces

Before timing, the engine's decisions on the first 2048 requests are checked against
cedarpy's on the whole set (allowed and deciding statements). Timing is timeit-style
(``keyring_encrypt.measure``): each case is calibrated to ~``--batch-time`` seconds per batch,
then batches of all cases are interleaved for ``--repeats`` rounds. Reported: decisions/s and
µs/decision (best and median) and each row's speed-up over the re-parse reference (best over
best).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from keyring_encrypt import measure

DISTINCT = 16384  # 4x the engine's entity cache: cycling through them, every lookup misses
CHECKED = 2048  # requests cross-checked against cedarpy, and the floor's pre-built handles
HOT = 64
MONDAY_10H = 1_704_103_200


def make_policies(count: int) -> dict[str, str]:
    """``count`` named policies: mostly per-team, plus a few cross-cutting ones."""
    policies = {
        "guard-disabled": (
            'forbid(principal, action in Keygrants::Action::"crypto", resource is Keygrants::Key)\n'
            '  when { resource.state != "enabled" };\n'
            'forbid(principal, action in Keygrants::Action::"crypto", resource)\n'
            '  unless { context.source == "mtls" || context.source == "signature" };'),
        "business-hours": (
            'forbid(principal, action in Keygrants::Action::"key_admin", resource)\n'
            '  unless { context.weekday < 5 && context.hour >= 9 && context.hour < 17 };'),
        "auditors": (
            'permit(principal in Keygrants::Group::"auditor", action in Keygrants::Action::"read",'
            ' resource);\n'
            'permit(principal in Keygrants::Group::"auditor",'
            ' action == Keygrants::Action::"read_audit", resource);'),
        "grant-limits": (
            'permit(principal in Keygrants::Group::"leads", action == Keygrants::Action::"create_grant",'
            ' resource)\n'
            '  when { context has grant && context.grant.ttl <= 300 && context.grant.uses > 0 &&\n'
            '         context.grant.uses <= 10 && context.grant.pop };'),
    }
    team = 0
    while len(policies) < count:
        if team % 5 == 4:
            policies[f"svc-{team}"] = (
                f'permit(principal == Keygrants::Principal::"svc-{team}", '
                f'action in [Keygrants::Action::"sign", Keygrants::Action::"verify"], resource)\n'
                f'  when {{ resource.tags.contains("team{team % 40}") }};')
        else:
            policies[f"team-{team}"] = (
                f'permit(principal in Keygrants::Group::"team{team}", '
                f'action in Keygrants::Action::"crypto", resource is Keygrants::Key)\n'
                f'  when {{ resource.name like "team{team}-*" }};\n'
                f'forbid(principal in Keygrants::Group::"team{team}", '
                f'action == Keygrants::Action::"decrypt", resource)\n'
                f'  unless {{ context.encryption_context.contains("tenant={team}") }};')
        team += 1
    return policies


def make_requests(principals: int, keys: int, teams: int, seed: int = 1) -> list[tuple[Any, ...]]:
    """DISTINCT requests: (PrincipalFacts, action, KeyFacts | None, RequestFacts)."""
    from keygrants.policy import ACTIONS, GrantFacts, KeyFacts, PrincipalFacts, RequestFacts

    rng = random.Random(seed)
    people = []
    for i in range(principals):
        tags = {f"team{i % teams}"}
        if i % 17 == 0:
            tags.add("auditor")
        if i % 7 == 0:
            tags.add("leads")
        people.append(PrincipalFacts(f"svc-{i}", frozenset(tags)))
    key_facts = [KeyFacts(id=f"k-{j}", name=f"team{j % teams}-key{j}", aliases=frozenset({f"alias-{j}"}),
                          spec="aes-256-gcm", purpose="encrypt",
                          state="disabled" if j % 23 == 0 else "enabled",
                          tags=frozenset({f"team{j % teams}"})) for j in range(keys)]
    actions = ["encrypt"] * 4 + ["decrypt"] * 4 + ["generate_data_key", "sign", "describe_key",
                                                    "create_grant", "list_keys", "rotate_key"]
    requests = []
    for _ in range(DISTINCT):
        principal = rng.choice(people)
        team = int(principal.id[4:]) % teams
        key = key_facts[team + teams * rng.randrange(max(1, keys // teams))]
        action = rng.choice(actions)
        grant = (GrantFacts(ttl=rng.choice([60, 300, 900]), uses=rng.choice([0, 5, 10]), pop=True)
                 if action == "create_grant" else None)
        request = RequestFacts(source=rng.choice(["mtls", "mtls", "signature", "api_key"]),
                               now=MONDAY_10H + rng.randrange(7 * 86400),
                               encryption_context={"tenant": str(rng.choice([team, team + 1]))},
                               grant=grant)
        requests.append((principal, action, key if ACTIONS[action] == "key" else None, request))
    return requests


def cedar_request(principal: Any, action: str, key: Any, request: Any) -> tuple[dict[str, Any], str]:
    """The plain-cedarpy form of one request: request dict (full context) and entities JSON."""
    now = request.now
    context: dict[str, Any] = {
        "source": request.source, "now": now, "hour": now // 3600 % 24,
        "weekday": (now // 86400 + 3) % 7,
        "encryption_context": [f"{k}={v}" for k, v in request.encryption_context.items()],
        "encryption_context_keys": list(request.encryption_context)}
    if request.grant is not None:
        g = request.grant
        context["grant"] = {"ttl": g.ttl, "uses": g.uses, "pop": g.pop,
                            "operations": sorted(g.operations), "audiences": sorted(g.audiences)}
    entities: list[dict[str, Any]] = [
        {"uid": {"type": "Keygrants::Principal", "id": principal.id},
         "attrs": {"id": principal.id, "tags": sorted(principal.tags)},
         "parents": [{"type": "Keygrants::Group", "id": t} for t in sorted(principal.tags)]},
        {"uid": {"type": "Keygrants::Service", "id": "keygrants"}, "attrs": {}, "parents": []}]
    if key is not None:
        entities.append({"uid": {"type": "Keygrants::Key", "id": key.id},
                         "attrs": {"id": key.id, "name": key.name, "aliases": sorted(key.aliases),
                                   "spec": key.spec, "purpose": key.purpose, "state": key.state,
                                   "tags": sorted(key.tags)},
                         "parents": []})
    resource = ({"type": "Keygrants::Key", "id": key.id} if key is not None
                else {"type": "Keygrants::Service", "id": "keygrants"})
    return ({"principal": {"type": "Keygrants::Principal", "id": principal.id},
             "action": {"type": "Keygrants::Action", "id": action}, "resource": resource,
             "context": context}, json.dumps(entities))


def build_cases(args: argparse.Namespace) -> tuple[dict[str, Callable[[], object]], list[str]]:
    import cedarpy

    from keygrants.policy import SCHEMA, PolicyEngine

    policies = make_policies(args.policies)
    engine = PolicyEngine(policies)
    teams = sum(1 for name in policies if name.startswith("team-")) or 1
    requests = make_requests(args.principals, args.keys, teams)
    notes = [f"{len(policies)} policies ({engine.statement_count} statements), {args.principals} principals, "
             f"{args.keys} keys, {DISTINCT} distinct requests (hot: {HOT})"]

    # the whole set under the engine's statement ids, for the floor and the cross-check
    whole: dict[str, Any] = {}
    for name, text in policies.items():
        doc = json.loads(cedarpy.policies_to_json_str(text))
        for i in range(len(doc["staticPolicies"])):
            whole[f"{name}#{i + 1}"] = doc["staticPolicies"][f"policy{i}"]
    policy_set = cedarpy.PolicySet.from_json_str(
        json.dumps({"staticPolicies": whole, "templates": {}, "templateLinks": []}))
    policy_text = cedarpy.policies_from_json_str(
        json.dumps({"staticPolicies": whole, "templates": {}, "templateLinks": []}))
    schema = cedarpy.Schema.from_str(SCHEMA)

    plain = [cedar_request(*r) for r in requests]
    handles = [cedarpy.Entities.from_json_str(entities, schema) for _, entities in plain[:CHECKED]]
    allowed = 0
    for r, (request, _), handle in zip(requests, plain, handles, strict=False):
        got = engine.decide(*r)
        want = cedarpy.is_authorized(request, policy_set, handle)
        if got.allowed != want.allowed or set(got.reasons) != set(want.diagnostics.reasons):
            raise SystemExit(f"engine and cedarpy disagree on {r}: {got} vs {want.diagnostics.reasons}")
        allowed += got.allowed
    notes.append(f"cross-checked: the engine agrees with cedarpy on {CHECKED} requests "
                 f"({allowed} allowed)")

    spread = itertools.cycle(requests)
    hot = itertools.cycle(requests[:HOT])
    floor = itertools.cycle(list(zip((p[0] for p in plain), handles, strict=False)))
    reparse = itertools.cycle(plain)
    decide = engine.decide
    is_authorized = cedarpy.is_authorized

    def run_floor() -> object:
        request, handle = next(floor)
        return is_authorized(request, policy_set, handle)

    def run_reparse() -> object:
        request, entities = next(reparse)
        return is_authorized(request, policy_text, entities, schema=schema)

    cases: dict[str, Callable[[], object]] = {
        "engine spread": lambda: decide(*next(spread)),
        "engine hot": lambda: decide(*next(hot)),
        "cedarpy floor": run_floor,
        "cedarpy re-parse": run_reparse,
    }
    return cases, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--policies", type=int, default=50, help="named policies (50)")
    p.add_argument("--principals", type=int, default=1000, help="distinct principals (1000)")
    p.add_argument("--keys", type=int, default=400, help="distinct keys (400)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (7)")
    p.add_argument("--batch-time", type=float, default=0.1, help="seconds per timed batch (0.1)")
    p.add_argument("--json", metavar="OUT", type=Path, help="write results as JSON")
    args = p.parse_args(argv)
    try:
        cases, notes = build_cases(args)
    except ImportError as exc:
        print(f"error: cannot import keygrants ({exc}); run: pip install -e .", file=sys.stderr)
        return 1

    machine = {"nproc": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
               "platform": platform.platform()}
    print(f"machine: nproc={machine['nproc']}, python={machine['python']}, {machine['platform']}")
    print(f"{args.repeats} interleaved repeats, ~{args.batch_time}s per batch")
    for note in notes:
        print(f"note: {note}")
    results = measure(cases, args.repeats, args.batch_time)
    reference = results["cedarpy re-parse"]
    width = max(len(name) for name in results)
    print(f"\n  {'case':<{width}} {'best dec/s':>11} {'median dec/s':>13} {'best µs':>8} {'median µs':>10} "
          f"{'vs re-parse':>12}")
    for name, r in results.items():
        r["speedup_best"] = reference["best_us"] / r["best_us"]
        print(f"  {name:<{width}} {1e6 / r['best_us']:>11,.0f} {1e6 / r['median_us']:>13,.0f} "
              f"{r['best_us']:>8.1f} {r['median_us']:>10.1f} {r['speedup_best']:>11.1f}x")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine,
            "config": {"policies": args.policies, "principals": args.principals, "keys": args.keys,
                       "repeats": args.repeats, "batch_time": args.batch_time},
            "notes": notes, "results": results}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
