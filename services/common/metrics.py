"""Prometheus metrics for the gRPC boundary, per (service, method, code).

Every metric lives in a CollectorRegistry handed in by the caller (one per server), never the
process-global one, so many servers can run in one test process. Labels are bounded: service
and method come from the registered handlers (unknown methods never reach the interceptor),
code is a grpc status code name. No ids, names or secrets ever become label values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

# Unary calls take milliseconds; pulls, installs and generations stream for minutes.
HANDLING_SECONDS_BUCKETS = (
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
    60.0,
    300.0,
    900.0,
    3600.0,
)


@dataclass(frozen=True)
class RpcMethodLabels:
    """The bounded label values of one RPC method."""

    service: str
    method: str

    @classmethod
    def from_full_method(cls, full_method: str) -> RpcMethodLabels:
        """Split a gRPC path such as "/rbee.catalog.v1.CatalogService/GetModel"."""
        service, _, method = full_method.lstrip("/").rpartition("/")
        return cls(service=service or "unknown", method=method or "unknown")


class GrpcServerMetrics:
    """The rbee_grpc_server_* metric families, registered in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "rbee_grpc_server_started_total",
            "RPCs started on the server.",
            ["service", "method"],
            registry=registry,
        )
        self.handled = Counter(
            "rbee_grpc_server_handled_total",
            "RPCs completed on the server, by final status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "rbee_grpc_server_handling_seconds",
            "Time from the start of an RPC to its final status, by status code.",
            ["service", "method", "code"],
            registry=registry,
            buckets=HANDLING_SECONDS_BUCKETS,
        )
        self.msg_sent = Counter(
            "rbee_grpc_server_msg_sent_total",
            "Messages sent by server-streaming RPCs.",
            ["service", "method"],
            registry=registry,
        )

    def for_method(self, full_method: str) -> MethodMetrics:
        """The metric children of one method (a gRPC path), bound once for all its calls."""
        return MethodMetrics(self, RpcMethodLabels.from_full_method(full_method))

    def record_started(self, labels: RpcMethodLabels) -> None:
        """Count one RPC start."""
        self.started.labels(labels.service, labels.method).inc()

    def record_message_sent(self, labels: RpcMethodLabels) -> None:
        """Count one streamed response message."""
        self.msg_sent.labels(labels.service, labels.method).inc()

    def record_handled(self, labels: RpcMethodLabels, code: str, seconds: float) -> None:
        """Count one finished RPC with its final status code name and duration."""
        self.handled.labels(labels.service, labels.method, code).inc()
        self.handling_seconds.labels(labels.service, labels.method, code).observe(seconds)


class MethodMetrics:
    """One method's rbee_grpc_server_* children, its labels bound once.

    Binding (`Counter.labels(...)`) validates and looks up the label values under a lock; the
    server wrapper records four samples per call, so it binds them on a method's first call
    and keeps them (per status code for the handled counter and histogram).
    """

    def __init__(self, metrics: GrpcServerMetrics, labels: RpcMethodLabels) -> None:
        self._metrics = metrics
        self.labels = labels
        self.started = metrics.started.labels(labels.service, labels.method)
        self.msg_sent = metrics.msg_sent.labels(labels.service, labels.method)
        self._by_code: dict[str, tuple[Any, Any]] = {}

    def handled(self, code: str, seconds: float) -> None:
        """Count one finished call with its final status code name and duration."""
        children = self._by_code.get(code)
        if children is None:
            service, method = self.labels.service, self.labels.method
            children = (
                self._metrics.handled.labels(service, method, code),
                self._metrics.handling_seconds.labels(service, method, code),
            )
            self._by_code[code] = children
        children[0].inc()
        children[1].observe(seconds)
