"""Prometheus metrics of one server: requests by route and status, latency, batch sizes, readiness.

Each app gets its own registry, so two servers in one process (tests) never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mmfuse_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("mmfuse_request_seconds", "Time to answer a request, by route", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("mmfuse_batch_size", "Samples per model call (micro-batching)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.inference = Histogram("mmfuse_inference_seconds", "Time of one model call",
                                   buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ready = Gauge("mmfuse_model_ready", "1 once the model is loaded", registry=self.registry)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
