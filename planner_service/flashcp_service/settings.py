"""Server settings: command-line flags override ``FLASHCP_*`` environment variables.

Only this module reads the environment. Every limit that keeps a shared
sidecar healthy lives here; see ``planner_service/README.md`` for the table.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Ports, limits and pool sizes of one planner server process.

    Each field ``x`` is read from the environment variable ``FLASHCP_X``
    (e.g. ``FLASHCP_GRPC_PORT=50051``) unless given explicitly.
    """

    model_config = SettingsConfigDict(env_prefix="FLASHCP_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    """Interface both servers bind (``0.0.0.0`` in the container image)."""
    http_port: int = Field(default=8080, ge=0, le=65535)
    """HTTP (FastAPI) port; 0 lets the OS pick one."""
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port; 0 lets the OS pick one."""

    max_documents: int = Field(default=65536, ge=1)
    """Most documents in one request, over all its micro-batches."""
    max_micro_batches: int = Field(default=1024, ge=1)
    """Most micro-batches in one request."""
    max_document_ranks: int = Field(default=1 << 22, ge=1)
    """Most documents x ``cp_size`` in one request: bounds the plan size, since a
    per-document sharding gives every document a segment on every rank."""
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest request body (HTTP) or message (gRPC) accepted."""
    max_solver_time_s: float = Field(default=30.0, gt=0)
    """Cap on ``options.time_limit_s`` of exact strategies."""

    solver_workers: int = Field(default=1, ge=1)
    """Exact (optimum) searches running at once, one process each."""
    solver_queue: int = Field(default=2, ge=0)
    """Exact searches allowed to wait for a solver process; more are refused
    with RESOURCE_EXHAUSTED / HTTP 429."""
    solver_memory_bytes: int = Field(default=4 * 1024**3, ge=0)
    """Address-space limit of each search process (0: none). A search that
    exceeds it fails alone (RESOURCE_EXHAUSTED / 413), not the sidecar or its trainer."""
    heuristic_threads: int = Field(default=4, ge=1)
    """Threads planning large heuristic requests, so the event loop stays responsive."""
    inline_max_document_ranks: int = Field(default=16384, ge=0)
    """Heuristic requests of at most this many documents x ``cp_size`` (over all micro-batches) are
    planned on the event loop itself instead of a thread: the thread hop costs more than such a plan
    saves by leaving the loop free (about 0.2 ms of a 1 ms plan, measured; 1,024 documents at N=8 plan
    in about 1 ms). The loop (both servers) waits meanwhile; the planner's search of small instances
    (<= 32 documents, N <= 16) can take about 15 ms. 0: always a thread."""

    recent_plans: int = Field(default=0, ge=0, le=100_000)
    """Summaries of the last this-many returned plans kept for ``GET /v1/recent`` (the explorer's Live
    view): strategy, sizes, makespan, lower bound and document lengths only (16 MiB of lengths at
    most, :mod:`flashcp_service.recent`). 0: off."""
    recent_sample_every: int = Field(default=1, ge=1)
    """Keep one returned plan in this many in the recent-plans buffer."""

    default_cost_model: str = "h100-llama8b"
    """Preset used when a request names no cost model."""
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long in-flight requests may take before the process exits."""
    log_level: str = "info"
    """Python logging level of the server and its one-line-per-request access log."""
