"""rbee.common.v1.InfoService, served by every rbee server beside health and reflection.

It answers what a status page or `rbee status` wants to show: which services this process
serves, the project version, Python and platform, when it started, whether it asks for a token,
and where its metrics are. Nothing here is a secret (no token, no paths).
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from rbee.common.v1 import info_pb2, info_pb2_grpc

INFO_SERVICE_NAME = "rbee.common.v1.InfoService"
DISTRIBUTION_NAME = "rbee-mesh"
UNKNOWN_VERSION = "0+unknown"


def project_version() -> str:
    """The installed rbee-mesh version (UNKNOWN_VERSION when run from an uninstalled tree)."""
    try:
        return importlib.metadata.version(DISTRIBUTION_NAME)
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


class InfoServicer(info_pb2_grpc.InfoServiceServicer):
    """Answers GetServiceInfo; `metrics_url` is filled in once the metrics endpoint is bound."""

    def __init__(self, service_names: tuple[str, ...], *, auth_required: bool) -> None:
        start = Timestamp()
        start.FromDatetime(datetime.now(UTC))
        self._info = info_pb2.ServiceInfo(
            services=list(service_names),
            version=project_version(),
            python_version=platform.python_version(),
            platform=sys.platform,
            cpu_architecture=platform.machine(),
            start_time=start,
            auth_required=auth_required,
        )

    def set_metrics_url(self, url: str) -> None:
        self._info.metrics_url = url

    async def GetServiceInfo(  # noqa: N802 (the generated servicer name)
        self, request: info_pb2.GetServiceInfoRequest, context: grpc.aio.ServicerContext
    ) -> info_pb2.ServiceInfo:
        return self._info
