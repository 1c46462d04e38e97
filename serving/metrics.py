"""Prometheus metrics of the service, created once per process on first use.

Created lazily (not at import) because ``bentoml serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` in each worker
after the service module is imported; metrics made after that land in BentoML's multiprocess registry and
come out on its ``/metrics`` endpoint next to the built-in request metrics.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

_LOCK = threading.Lock()
_METRICS: "Metrics | None" = None

LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
CANDIDATE_BUCKETS = (0, 10, 50, 100, 200, 300, 400, 500, 750, 1000, 2000)


@dataclass
class Metrics:
    latency: Any  # Histogram, label endpoint
    stage: Any  # Histogram, label stage (retrieval, ranking, policy)
    candidates: Any  # Histogram
    requests: Any  # Counter, labels endpoint, outcome
    cold_start: Any  # Counter
    bundle: Any  # Gauge, label version: 1 for the serving bundle
    gini: Any  # Gauge
    boost: Any  # Gauge
    reloads: Any  # Counter, label outcome

    def set_bundle(self, new: str, old: str | None = None) -> None:
        if old is not None and old != new:
            self.bundle.labels(version=old).set(0)
        self.bundle.labels(version=new).set(1)


def metrics() -> Metrics:
    global _METRICS
    with _LOCK:
        if _METRICS is None:
            from prometheus_client import Counter, Gauge, Histogram

            _METRICS = Metrics(
                latency=Histogram("feedstack_request_latency_seconds", "Time inside the service per request",
                                  ["endpoint"], buckets=LATENCY_BUCKETS),
                stage=Histogram("feedstack_stage_latency_seconds", "Time per request stage", ["stage"],
                                buckets=LATENCY_BUCKETS),
                candidates=Histogram("feedstack_candidates", "Candidates retrieved per /recommend",
                                     buckets=CANDIDATE_BUCKETS),
                requests=Counter("feedstack_requests", "Requests by endpoint and outcome", ["endpoint", "outcome"]),
                cold_start=Counter("feedstack_cold_start", "Requests for users unknown to the bundle"),
                bundle=Gauge("feedstack_bundle_info", "1 for the bundle version being served", ["version"],
                             multiprocess_mode="livemax"),
                gini=Gauge("feedstack_creator_exposure_gini", "Gini coefficient of decayed creator exposure",
                           multiprocess_mode="livemax"),
                boost=Gauge("feedstack_exposure_boost", "Current boost strength of the exposure controller",
                            multiprocess_mode="livemax"),
                reloads=Counter("feedstack_bundle_reloads", "Bundle reload attempts by outcome", ["outcome"]),
            )
        return _METRICS
