# syntax=docker/dockerfile:1
# reconciler service image. Build: docker build -t reconciler .
# Configuration: the repository's config.yaml is the default at /etc/reconciler/config.yaml; mount your own
# over it. Secrets (STRIPE_API_KEY, OPENMETER_API_TOKEN, MOESIF_MANAGEMENT_TOKEN) come from the environment
# at run time only, never from this file. See compose.yaml for a PostgreSQL-backed example.

# ---- builder: install the project and its dependencies (from pyproject.toml) into a venv at /opt/venv ----
FROM python:3.11-slim-bookworm AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY reconciler/ reconciler/
COPY migrations/ migrations/
RUN pip install --no-cache-dir .

# ---- runtime: the venv only, run as a non-root user ----
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RECONCILER_CONFIG=/etc/reconciler/config.yaml \
    RECONCILER_SERVER_HOST=0.0.0.0 \
    RECONCILER_SERVER_OPS_HOST=0.0.0.0

# A fixed numeric uid/gid, so orchestrators can verify runAsNonRoot. /var/lib/reconciler is the working
# directory: the default SQLite ledger (sqlite:///reconciler.db, relative) is created there.
RUN groupadd --system --gid 10001 reconciler \
    && useradd --system --uid 10001 --gid reconciler --home-dir /var/lib/reconciler --no-create-home \
       --shell /usr/sbin/nologin reconciler \
    && install -d -o reconciler -g reconciler -m 0750 /var/lib/reconciler

COPY --from=builder /opt/venv /opt/venv
COPY config.yaml /etc/reconciler/config.yaml

WORKDIR /var/lib/reconciler
USER 10001:10001

# 8080: the webhook listener (server.port), the one port to publish. 8090: the operations listener
# (server.ops_port: /healthz, /readyz, /metrics), for the container network only; the HEALTHCHECK asks it.
EXPOSE 8080 8090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["reconciler", "healthcheck"]

ENTRYPOINT ["reconciler"]
CMD ["run"]
