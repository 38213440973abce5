# FlashCP planner sidecar: gRPC (50051) + HTTP (8080), no torch inside.
# Build: docker build -t flashcp-planner .
# Run:   docker run --rm -p 8080:8080 -p 50051:50051 flashcp-planner

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for the planner's compiled search engine (Cython, built by setup.py); builder stage only.
# DL3008: the compiler comes from the base image's Debian release; pinning its exact build would break
# on every point release of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY planner_service/ planner_service/
COPY proto/ proto/
COPY client/ client/
COPY kernels/ kernels/
# The server extra: planning core, OR-Tools, grpcio, FastAPI/uvicorn, prometheus-client (no torch).
# DL3013: this installs the local project; its dependency pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[server]" \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && python -c "from flashcp_planner.strategies.flashcp import NATIVE_AVAILABLE; assert NATIVE_AVAILABLE"

FROM python:3.11-slim
RUN groupadd --system --gid 10001 flashcp \
    && useradd --system --uid 10001 --gid flashcp --no-create-home --shell /usr/sbin/nologin flashcp
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLASHCP_HOST=0.0.0.0 \
    FLASHCP_HTTP_PORT=8080 \
    FLASHCP_GRPC_PORT=50051
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FLASHCP_HTTP_PORT', '8080'), timeout=2)"]
# SIGTERM drains in-flight requests, then the process exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["flashcp", "serve"]
