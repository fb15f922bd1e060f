"""The worker's domain metrics (rbee_worker_*), registered in the server's CollectorRegistry.

Labels are bounded: `finish_reason` takes the FinishReason values plus "error" (the request
failed), "rejected" (queue full, wrong model, bad request before any work) and "completed" (an
image request that finished: images have no finish reason). Nothing
request-specific (prompts, model names, ids) ever becomes a label value.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.worker.engines.base import FinishReason

FINISH_ERROR = "error"
FINISH_REJECTED = "rejected"
FINISH_COMPLETED = "completed"
FINISH_LABELS = (
    *(reason.value for reason in FinishReason),
    FINISH_ERROR,
    FINISH_REJECTED,
    FINISH_COMPLETED,
)

# Time to first token: a tiny model on a GPU answers in ~1 ms, a long prompt on a CPU in many
# seconds.
TTFT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# Between tokens: from ~0.1 ms (tiny models) to a second (a large model on a CPU).
INTER_TOKEN_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
# Denoising steps per second: from a large model on a CPU (~0.05) to a tiny one (~100s).
IMAGE_STEPS_PER_SECOND_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class WorkerMetrics:
    """The rbee_worker_* families, in one registry (one per server)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.time_to_first_token = Histogram(
            "rbee_worker_time_to_first_token_seconds",
            "From the start of a generation (after the queue) to its first token delta.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "rbee_worker_inter_token_seconds",
            "Time between consecutive token deltas of a generation.",
            buckets=INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.tokens_generated = Counter(
            "rbee_worker_tokens_generated_total",
            "Tokens generated (completion tokens).",
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "rbee_worker_prompt_tokens_total",
            "Prompt tokens processed.",
            registry=registry,
        )
        self.requests = Counter(
            "rbee_worker_requests_total",
            "Generation requests finished, by finish reason (error, rejected for failures).",
            ["finish_reason"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "rbee_worker_queue_depth",
            "Requests waiting behind the running one.",
            registry=registry,
        )
        self.model_load = Histogram(
            "rbee_worker_model_load_seconds",
            "How long successful model loads took.",
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.model_memory = Gauge(
            "rbee_worker_model_memory_bytes",
            "Memory attributed to the loaded model (0 when none is loaded).",
            registry=registry,
        )
        self.image_steps = Counter(
            "rbee_worker_image_steps_total",
            "Denoising steps run by image requests (cancelled ones included).",
            registry=registry,
        )
        self.image_steps_per_second = Histogram(
            "rbee_worker_image_steps_per_second",
            "Denoising steps per second of each finished image request.",
            buckets=IMAGE_STEPS_PER_SECOND_BUCKETS,
            registry=registry,
        )
        # Children created up front so every reason shows (as 0) before it first happens.
        self._requests_by_reason = {label: self.requests.labels(label) for label in FINISH_LABELS}
        self._registry = registry
        self.device_memory: Gauge | None = None

    def track_device_memory(self, read: Callable[[], float]) -> None:
        """Export `rbee_worker_device_memory_bytes`, read at scrape time (GPU workers only: a
        CPU worker has no such gauge rather than a made-up 0)."""
        if self.device_memory is None:
            self.device_memory = Gauge(
                "rbee_worker_device_memory_bytes",
                "GPU memory this worker process holds, as nvidia-smi reports it (context, "
                "weights, caches); NaN where it cannot be measured.",
                registry=self._registry,
            )
        self.device_memory.set_function(read)

    def count_request(self, finish_reason: str) -> None:
        """Count one finished request; `finish_reason` must be one of FINISH_LABELS."""
        self._requests_by_reason[finish_reason].inc()
