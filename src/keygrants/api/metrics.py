"""What one server node counts, in the Prometheus text format (``GET /metrics``).

The request path only updates plain dicts (a dict update per request, no lock: the counters
are touched by the event loop's thread only); :func:`render` turns them into metric families
through ``prometheus_client`` when a scraper asks. Counters are per node and start at zero
when the process starts, as Prometheus expects (``rate()`` handles the reset).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from keygrants._version import __version__

__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS", "Gauge", "Metrics", "render"]

#: The media type of the text exposition format.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds (seconds) of the request-duration histogram's buckets; ``+Inf`` is implied.
DURATION_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                           5.0, 10.0)

#: Requests that matched no route are counted under this operation (their path is not a label:
#: a client could otherwise create a series per path it tries).
UNMATCHED: Final = "unmatched"


@dataclass(frozen=True, slots=True)
class Gauge:
    """A value read when scraped (e.g. how full a replay cache is)."""

    name: str
    help: str
    value: float


@dataclass(slots=True)
class _Durations:
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0


class Metrics:
    """The node's counters. Every label value comes from a fixed set (operation ids of the
    endpoint table, HTTP statuses, error codes), never from the request's own text."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.durations: dict[str, _Durations] = {}
        self.auth_failures: dict[str, int] = {}
        self.grant_denials: dict[str, int] = {}
        self.audit_unavailable = 0

    def request(self, operation: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration (from arrival to the answer)."""
        key = (operation, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        d = self.durations.get(operation)
        if d is None:
            d = self.durations[operation] = _Durations()
        d.buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        d.total += seconds

    def auth_failure(self, code: str) -> None:
        self.auth_failures[code] = self.auth_failures.get(code, 0) + 1

    def grant_denial(self, code: str) -> None:
        self.grant_denials[code] = self.grant_denials.get(code, 0) + 1


class _Collector(Collector):
    def __init__(self, metrics: Metrics, gauges: Callable[[], Iterable[Gauge]]) -> None:
        self._metrics = metrics
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        mx = self._metrics
        info = InfoMetricFamily("keygrants_build", "The keygrants version of this node")
        info.add_metric([], {"version": __version__})
        yield info
        requests = CounterMetricFamily(
            "keygrants_http_requests", "HTTP requests answered, by operation (the OpenAPI "
            "operationId) and status", labels=["operation", "status"])
        for (operation, status), n in sorted(mx.requests.items()):
            requests.add_metric([operation, str(status)], n)
        yield requests
        durations = HistogramMetricFamily(
            "keygrants_http_request_duration_seconds",
            "Time from a request's arrival to its answer (audit events durable), by operation",
            labels=["operation"])
        for operation, d in sorted(mx.durations.items()):
            cumulative, running = [], 0
            for bound, n in zip((*DURATION_BUCKETS, float("inf")), d.buckets, strict=True):
                running += n
                cumulative.append((_bound(bound), running))
            durations.add_metric([operation], cumulative, sum_value=d.total)
        yield durations
        failures = CounterMetricFamily(
            "keygrants_auth_failures", "Requests refused by authentication (401; 431 for an "
            "oversized credential header), by error code", labels=["code"])
        for code, n in sorted(mx.auth_failures.items()):
            failures.add_metric([code], n)
        yield failures
        denials = CounterMetricFamily(
            "keygrants_grant_denials", "Presented grant tokens refused, by error code",
            labels=["code"])
        for code, n in sorted(mx.grant_denials.items()):
            denials.add_metric([code], n)
        yield denials
        yield CounterMetricFamily(
            "keygrants_audit_unavailable", "Requests refused (503 audit_unavailable) because "
            "their audit events could not be made durable", value=mx.audit_unavailable)
        for g in self._gauges():
            yield GaugeMetricFamily(g.name, g.help, value=g.value)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def render(metrics: Metrics, gauges: Callable[[], Iterable[Gauge]] = tuple) -> bytes:
    """The text exposition of ``metrics``, the gauges ``gauges()`` returns now, and this
    process's CPU, memory and file descriptors (``process_*``, on Linux)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics, gauges))
    ProcessCollector(registry=registry)
    return generate_latest(registry)
