# syntax=docker/dockerfile:1
# The Berth operator image:  docker build -t berth:0.1.0 .
# Two stages on the same pinned slim base: the first installs the pinned
# wheels (requirements.lock) and the project into a venv, the second copies
# only that venv. No compiler anywhere (wheels only) and no pip in the venv.
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
RUN python -m venv --without-pip /opt/berth
# Dependencies first: this layer stays cached until the lock changes.
COPY requirements.lock ./
RUN pip --python /opt/berth/bin/python install --only-binary=:all: --no-deps \
        --requirement requirements.lock
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN pip --python /opt/berth/bin/python install --no-deps . \
 && pip --python /opt/berth/bin/python check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="berth" \
      org.opencontainers.image.description="Per-node port ranges for LLM inference pods" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/berth/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BERTH_LOG_FORMAT=json \
    HOME=/tmp \
    USER=berth
COPY --from=build /opt/berth /opt/berth
# Any non-root uid works; the chart runs 65532 with a read-only root
# filesystem and an emptyDir on /tmp. That uid has no /etc/passwd entry, so
# USER above names it: kopf asks getpass.getuser() for its identity.
USER 65532:65532
# 8080: Prometheus /metrics; 8081: kopf's /healthz (liveness and readiness).
EXPOSE 8080 8081
# Acts at once unless BERTH_LEADER_ELECTION=true (the chart's two replicas,
# docs/install.md); the range
# audit goes to stdout as JSON lines, logs to stderr.
ENTRYPOINT ["python", "-m", "berth", "--liveness=http://0.0.0.0:8081/healthz"]
