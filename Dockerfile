# cachesync: one image for every role; the command picks the role (see deploy/PRODUCTION.md):
#   docker run IMAGE run mapper
#   docker run IMAGE run sink --region eu-west --sink redis
#   docker run IMAGE topology apply
# /metrics, /healthz and /readyz listen on 0.0.0.0:9464 (CACHESYNC_METRICS_HOST/_PORT).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build: the wheel and its dependencies into a virtualenv, which is all the runtime gets.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/cachesync
COPY pyproject.toml README.md ./
COPY consumers/ consumers/
COPY schemas/ schemas/
COPY topology/ topology/
RUN /opt/cachesync/bin/pip install --no-cache-dir . \
    && /opt/cachesync/bin/cachesync --help >/dev/null

# Runtime: the slim base, the virtualenv, an unprivileged user; no compiler, no sources.
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cachesync" \
      org.opencontainers.image.description="Event-driven cache invalidation and warming across Redis, CDNs and edges, per region"
RUN groupadd --system --gid 10001 cachesync \
    && useradd --system --uid 10001 --gid cachesync --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin cachesync
COPY --from=build /opt/cachesync /opt/cachesync
ENV PATH=/opt/cachesync/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CACHESYNC_METRICS_HOST=0.0.0.0 \
    CACHESYNC_METRICS_PORT=9464
# A numeric user, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
WORKDIR /tmp
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CACHESYNC_METRICS_PORT', '9464'), timeout=2)"]
ENTRYPOINT ["cachesync"]
CMD ["run", "mapper"]
