"""Prometheus metrics of one service instance, in their own registry.

A registry per :class:`ServiceMetrics` (not the process-global default) lets
tests build several services and apps side by side; ``GET /metrics`` exposes
the registry of the service the app wraps, gRPC traffic included.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from flashcp_planner.model import Plan

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATIO_BUCKETS = (1.0, 1.01, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 5.0)


class ServiceMetrics:
    """Request, plan and solver metrics.

    Attributes:
        registry: the collector registry every metric of this instance lives in.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "flashcp_requests_total",
            "Requests served, by transport, route and status (HTTP code or gRPC status name).",
            ["transport", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "flashcp_request_duration_seconds",
            "Request latency in seconds, by transport, route and status.",
            ["transport", "route", "status"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "flashcp_requests_in_flight", "Requests being served now.", registry=self.registry
        )
        self.makespan_ratio = Histogram(
            "flashcp_plan_makespan_ratio",
            "Predicted makespan of returned plans over their lower bound, by strategy.",
            ["strategy"],
            buckets=_RATIO_BUCKETS,
            registry=self.registry,
        )
        self.solver_timeouts = Counter(
            "flashcp_solver_timeouts_total",
            "Exact searches that hit their time limit before proving optimality.",
            registry=self.registry,
        )
        self.solver_rejections = Counter(
            "flashcp_solver_rejections_total",
            "Exact searches refused because every solver slot was busy.",
            registry=self.registry,
        )
        # Labelled children by label values: ``labels()`` validates and locks on every call.
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._ratio_children: dict[str, Any] = {}

    def observe_request(self, *, transport: str, route: str, status: str, seconds: float) -> None:
        """Count one finished request."""
        key = (transport, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (self.requests.labels(*key), self.latency.labels(*key))
        children[0].inc()
        children[1].observe(seconds)

    def observe_plan(self, plan: Plan) -> None:
        """Record the quality of a returned plan and whether its solver timed out."""
        if plan.lower_bound_ms > 0:
            ratio = self._ratio_children.get(plan.strategy)
            if ratio is None:
                ratio = self._ratio_children[plan.strategy] = self.makespan_ratio.labels(plan.strategy)
            ratio.observe(plan.makespan_ms / plan.lower_bound_ms)
        if plan.optimality is not None and plan.optimality.status != "optimal":
            self.solver_timeouts.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
