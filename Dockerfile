# syntax=docker/dockerfile:1
# The broker as a sidecar image. BASE must provide python3 (3.11+) with venv; the final stage adds no
# compiler or package manager of its own.
ARG BASE=python:3.12-slim-bookworm

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
RUN python3 -m venv /opt/broker \
 && /opt/broker/bin/pip install --no-cache-dir --disable-pip-version-check '.[all]' \
 && /opt/broker/bin/pip uninstall --yes pip \
 && find /opt/broker -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="broker" \
      org.opencontainers.image.description="Sidecar credential broker for Apache Airflow" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/broker /opt/broker
ENV PATH=/opt/broker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /run/broker
EXPOSE 9464
ENTRYPOINT ["broker", "serve"]
CMD ["--config", "/etc/broker/broker.yaml"]
