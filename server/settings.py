"""The gateway's settings and their defaults: read by the CLI and the YAML
spec before anything loads, so nothing here imports the web stack."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


@dataclass(frozen=True, slots=True)
class ServerSettings:
    served_model_name: str
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 16 << 10  # the request line and headers together
    max_headers: int = 100
    max_running_requests: int = 8
    max_waiting_requests: int = 64
    shutdown_grace_s: float = 10.0  # running requests may finish for this long after SIGTERM
