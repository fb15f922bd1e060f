"""The provisioner's domain metrics (rbee_provisioner_*), in the server's CollectorRegistry.

Labels are bounded: `source` is a source kind (huggingface, civitai, url, local), `outcome` a
terminal pull state, `reason` an ErrorReason name. Never a repo, file, URL or token.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A pull takes from milliseconds (all cached) to hours (a 100 GB model on a slow line).
PULL_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 21600)


class ProvisionerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes_downloaded = Counter(
            "rbee_provisioner_downloaded_bytes",
            "Bytes received from upstreams by pulls (not counting reused partial or cached bytes).",
            ["source"],
            registry=registry,
        )
        self.active_pulls = Gauge(
            "rbee_provisioner_active_pulls",
            "Pulls running now (queued, resolving, downloading, verifying or registering).",
            registry=registry,
        )
        self.pull_duration = Histogram(
            "rbee_provisioner_pull_duration_seconds",
            "Wall time of a pull run, from start to its terminal state.",
            ["source", "outcome"],
            buckets=PULL_DURATION_BUCKETS,
            registry=registry,
        )
        self.pull_failures = Counter(
            "rbee_provisioner_pull_failures",
            "Pulls that ended FAILED, by ErrorInfo reason.",
            ["reason"],
            registry=registry,
        )
