"""The pool's domain metrics (rbee_pool_*), in the server's CollectorRegistry.

Labels are bounded: `state` a worker state, `outcome` succeeded/failed, `exit` expected (after
StopWorker) or unexpected, `start` warm/cold. Never a model, worker name or path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.worker.pool.domain import PoolWorkerState

# From a cached tiny model on a CPU (~1 s) to a large model read from a cold disk (minutes).
SPAWN_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class PoolMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.workers = Gauge(
            "rbee_pool_workers", "Workers of this pool by state.", ["state"], registry=registry
        )
        for state in PoolWorkerState:
            self.workers.labels(state.value).set(0)
        self.spawn_duration = Histogram(
            "rbee_pool_spawn_duration_seconds",
            "SpawnWorker from the request to READY (or to the failure).",
            ["outcome"],
            buckets=SPAWN_BUCKETS,
            registry=registry,
        )
        self.exits = Counter(
            "rbee_pool_worker_exits",
            "Worker process exits: expected (stopped) or unexpected (crashed).",
            ["exit"],
            registry=registry,
        )
        self.starts = Counter(
            "rbee_pool_worker_starts",
            "Worker processes started: warm (from a spare that had already started) or cold.",
            ["start"],
            registry=registry,
        )
        for start in ("warm", "cold"):
            self.starts.labels(start)
        self.spares = Gauge(
            "rbee_pool_spare_workers",
            "Warm spares started and ready to become a worker.",
            registry=registry,
        )
        self.restarts = Counter(
            "rbee_pool_worker_restarts", "Restarts made by restart policies.", registry=registry
        )

    def count_states(self, states: list[PoolWorkerState]) -> None:
        for state in PoolWorkerState:
            self.workers.labels(state.value).set(sum(1 for s in states if s is state))
