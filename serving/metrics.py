"""Prometheus metrics of the serving layer, on a registry of their own, and their HTTP endpoint.

Engine-wide numbers (running/waiting requests, KV usage, preemptions, token totals) come from the
engine's `stats()` snapshot after each step; per-request latencies and outcomes are recorded by the
gRPC handlers as responses reach them, so they include the time the client actually waits.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Finish reasons of completed requests, then how a request can end without one.
OUTCOMES = (
    "stop",
    "length",
    "abort",
    "cancelled",
    "deadline_exceeded",
    "invalid_argument",
    "already_exists",
    "resource_exhausted",
    "unavailable",
    "internal",
)

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.4,
    0.8, 1.6, 5.0,
)  # fmt: skip


class MetricsEndpoint:
    """A running `/metrics` HTTP server; `close()` stops it and frees the port."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.num_running = Gauge(
            "jaxserve_num_requests_running", "Requests in the engine's running batch.", registry=r
        )
        self.num_waiting = Gauge(
            "jaxserve_num_requests_waiting", "Requests waiting for a batch slot.", registry=r
        )
        self.kv_usage = Gauge(
            "jaxserve_kv_cache_usage_ratio", "Fraction of KV-cache pages in use.", registry=r
        )
        self.kv_used_tokens = Gauge(
            "jaxserve_kv_cache_used_tokens", "KV-cache token slots in use.", registry=r
        )
        self.preemptions = Counter(
            "jaxserve_num_preemptions", "Requests preempted to free KV-cache pages.", registry=r
        )
        self.prompt_tokens = Counter(
            "jaxserve_prompt_tokens", "Prompt tokens prefilled.", registry=r
        )
        self.generation_tokens = Counter(
            "jaxserve_generation_tokens", "Tokens generated.", registry=r
        )
        self.prefix_cache_queries = Counter(
            "jaxserve_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "jaxserve_prefix_cache_hits",
            "Prompt tokens served from the prefix cache (hit rate = hits / queries).",
            registry=r,
        )
        self.device_wait = Counter(
            "jaxserve_engine_device_wait_seconds",
            "Time the engine thread waited for device results; little of it against the "
            "wall time means the host, not the GPU, bounds the steps.",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "jaxserve_time_to_first_token_seconds",
            "From request arrival to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "jaxserve_inter_token_latency_seconds",
            "Between consecutive generated tokens of a sample.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "jaxserve_e2e_request_latency_seconds",
            "From request arrival to its last response.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "jaxserve_requests",
            "Finished requests by outcome (finish reason, or the gRPC error that ended them).",
            labelnames=("outcome",),
            registry=r,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.engine_step_failures = Counter(
            "jaxserve_engine_step_failures", "Engine steps that raised.", registry=r
        )
        self._lock = threading.Lock()
        self._totals: dict[str, float] = {}

    def observe_engine_stats(self, stats: Mapping[str, float]) -> None:
        """Records one `engine.stats()` snapshot; cumulative totals become counter increments."""
        self.num_running.set(stats["num_running"])
        self.num_waiting.set(stats["num_waiting"])
        self.kv_usage.set(stats["kv_usage"])
        self.kv_used_tokens.set(stats["kv_used_tokens"])
        with self._lock:
            for key, counter in (
                ("num_preemptions", self.preemptions),
                ("prompt_tokens_total", self.prompt_tokens),
                ("generation_tokens_total", self.generation_tokens),
                ("prefix_cache_queries_total", self.prefix_cache_queries),
                ("prefix_cache_hits_total", self.prefix_cache_hits),
                ("device_wait_seconds_total", self.device_wait),
            ):
                if key not in stats:  # a total this engine does not keep (no prefix cache)
                    continue
                value = stats[key]
                # A total that went down means the engine was rebuilt: count from its new origin.
                increment = value - self._totals.get(key, 0)
                if increment > 0:
                    counter.inc(increment)
                self._totals[key] = value

    def record_outcome(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def start_http(self, host: str, port: int) -> MetricsEndpoint:
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsEndpoint(httpd, thread)
