# syntax=docker/dockerfile:1
#
# One image for both halves of engram-replication:
#
#   docker run IMAGE operator ...   the kopf control plane (the chart's operator Deployment)
#   docker run IMAGE sidecar ...    one node's data-plane sidecar (the chart's node StatefulSet)
#
# ENTRYPOINT is the console script, so every subcommand works (`wal verify`, `--help`, ...).
# Build:  docker build -t engram-replication:0.1.0 .
#
# The base is pinned by tag, not by digest. A digest (python:3.11-slim-bookworm@sha256:...) is the
# stronger pin, but it can only be read from a registry, and this repository is written where no
# container registry is reachable, so no digest here could be checked. Release builds should pass
# the digest they resolved: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the project's wheel and every dependency's wheel, installed into a virtualenv ------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the wheel is built from (pyproject's hatch targets and its readme); .dockerignore
# keeps tests, docs, deploy/ and local state out of the build context.
COPY pyproject.toml README.md ./
COPY contract/ contract/
COPY operator/ operator/
COPY sidecar/ sidecar/
COPY bench/ bench/
# pip builds our wheel with hatchling (PEP 517, in an isolated build env) and fetches wheels for
# the dependencies; crc32c, zstandard, orjson, aiohttp and uvloop ship manylinux wheels, so no compiler
# is needed.
# The `fast` extra adds uvloop, the sidecar's event loop (event_loop: auto picks it), and caio,
# its kernel-AIO fsyncs (fsync_engine: auto picks it where the data volume allows).
RUN pip wheel --wheel-dir /wheels '.[fast]' \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /wheels 'engram-replication[fast]' \
 && /opt/venv/bin/python -c 'import uvloop' \
 && /opt/venv/bin/engram-replication --help >/dev/null \
 && rm -rf /opt/venv/lib/python3*/site-packages/engram_bench /opt/venv/bin/engram-replication-bench

# ---- runtime: the virtualenv on the same slim base, run as an unprivileged user ---------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="engram-replication" \
      org.opencontainers.image.description="Replication and failover for Engram memory spaces: operator and node sidecar" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_DISABLE_CREATED_SERIES=True
# uid/gid 10001: above the range distributions hand out, so it owns nothing on the host; the
# chart's securityContext runs as the same ids (runAsNonRoot needs a numeric USER to verify).
RUN groupadd --system --gid 10001 engram \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin engram \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# 8080: sidecar HTTP API (writes, status, /healthz, /readyz, /metrics)
# 7070: sidecar replication listener (peer-to-peer WAL shipping)
# 9090: operator metrics and health
EXPOSE 8080 7070 9090
# No HEALTHCHECK: the image runs two different programs with different ports, and Kubernetes
# ignores Docker health checks anyway. The chart's probes use /healthz and /readyz instead.
ENTRYPOINT ["engram-replication"]
CMD ["--help"]
