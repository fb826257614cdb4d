# syntax=docker/dockerfile:1
# One recipe for every Edgeway service image. SERVICE is the folder under services/ and the
# console script's suffix (edgeway-<SERVICE>); PORT its HTTP port (the gateway's public API, the
# other services' /healthz, /readyz, /metrics). deploy/compose/compose.yaml passes both.
# Build from the repository root, e.g.:
#   docker build -f deploy/docker/service.Dockerfile --build-arg SERVICE=telemetry \
#       --build-arg PORT=8082 -t edgeway/telemetry .
# PyAV's and Pillow's wheels bring their own FFmpeg and codecs: no system packages are needed.
ARG PYTHON_IMAGE=python:3.11-slim
ARG NODE_IMAGE=node:20-slim

# ---- builder: a virtual environment with libs/common and the service, pinned by constraints.txt
FROM ${PYTHON_IMAGE} AS builder
ARG SERVICE
# uv's version is the one the Makefile pins (UV_VERSION); tests/test_deploy.py keeps them equal.
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /bin/
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_NO_PROGRESS=1
WORKDIR /src
# The image's own interpreter, so the venv works unchanged in the runtime stage (same base image).
RUN uv venv --python /usr/local/bin/python3.11 /app/.venv
COPY constraints.txt ./
COPY libs/common ./libs/common
COPY services/${SERVICE} ./services/${SERVICE}
# --no-sources: libs/common is given here as a path, so the workspace source entries are not needed.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /app/.venv/bin/python --no-sources -c constraints.txt \
        ./libs/common ./services/${SERVICE}
# One name for the service's console script: ENTRYPOINT's exec form cannot expand a variable.
RUN test -x /app/.venv/bin/edgeway-${SERVICE} \
    && ln -s edgeway-${SERVICE} /app/.venv/bin/edgeway-service

# ---- console: the web console (web/), built as `make setup` builds it; the gateway serves it
# (EDGEWAY_CONSOLE_DIR), the other services carry its ~100 KB unused.
FROM ${NODE_IMAGE} AS console
WORKDIR /web
COPY web/package.json web/package-lock.json web/.npmrc ./
RUN --mount=type=cache,target=/root/.npm npm ci --no-audit --no-fund
COPY web ./
RUN npm run build

# ---- runtime: the venv only, a non-root user, no build tools
FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE
ARG PORT
LABEL org.opencontainers.image.title="edgeway-${SERVICE}" \
      org.opencontainers.image.description="Edgeway ${SERVICE} (services/${SERVICE}/README.md)"
RUN groupadd --system --gid 10001 edgeway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin edgeway \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/edgeway
COPY --from=builder /app/.venv /app/.venv
COPY --from=console /web/dist /app/console
ENV PATH=/app/.venv/bin:$PATH \
    EDGEWAY_CONSOLE_DIR=/app/console \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDGEWAY_HTTP_HOST=0.0.0.0 \
    EDGEWAY_HTTP_PORT=${PORT} \
    EDGEWAY_DATA_DIR=/var/lib/edgeway
WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE ${PORT}
# Liveness only (the process answers); slim has no curl, so Python asks.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['EDGEWAY_HTTP_PORT'], timeout=2)"]
# Exec form: the service is PID 1 and gets SIGTERM itself (it drains within EDGEWAY_GRACEFUL_TIMEOUT).
ENTRYPOINT ["edgeway-service"]
