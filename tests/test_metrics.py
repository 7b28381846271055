"""Engine stats snapshots become Prometheus gauges and counter increments."""

from __future__ import annotations

from serving.metrics import ServerMetrics


def value(metrics: ServerMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_totals_become_counter_increments_including_prefix_cache():
    m = ServerMetrics()
    base = dict(num_running=2, num_waiting=1, kv_usage=0.5, kv_used_tokens=64)
    totals = dict(
        num_preemptions=1,
        prompt_tokens_total=100,
        generation_tokens_total=10,
        device_wait_seconds_total=0.25,
    )
    m.observe_engine_stats(
        {**base, **totals, "prefix_cache_queries_total": 80, "prefix_cache_hits_total": 32}
    )
    m.observe_engine_stats(
        {**base, **totals, "prefix_cache_queries_total": 120, "prefix_cache_hits_total": 64}
    )
    assert value(m, "jaxserve_prefix_cache_queries_total") == 120
    assert value(m, "jaxserve_prefix_cache_hits_total") == 64
    assert value(m, "jaxserve_prompt_tokens_total") == 100
    assert value(m, "jaxserve_kv_cache_usage_ratio") == 0.5
    assert value(m, "jaxserve_engine_device_wait_seconds_total") == 0.25  # seconds, not rounded
    # An engine without a prefix cache reports no such keys; the counters stay where they are.
    m.observe_engine_stats({**base, **totals})
    assert value(m, "jaxserve_prefix_cache_hits_total") == 64
