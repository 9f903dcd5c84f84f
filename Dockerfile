# syntax=docker/dockerfile:1
# The broker as a sidecar image.
#
# BASE is any Debian-like image with python3 (3.11+), its venv module and CA certificates, for example
# docker.io/library/python:3.11-slim-bookworm or a debootstrap'ed bookworm with python3, python3-venv and
# ca-certificates. Both stages use the same BASE so the virtual environment's interpreter path is the same.
#
#   docker build -t REGISTRY/credential-broker:VERSION --build-arg VERSION=VERSION .
#
# The final image runs as the numeric non-root user 65532, writes nothing outside its mounted volumes (the
# root filesystem may be read-only), and carries no package manager, pip or compiler.
ARG BASE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE} AS build
# Where pip finds packages and which CA it trusts, for builds behind a mirror or a TLS-inspecting proxy.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
ARG EXTRAS=all
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
# The wheel is built from this source tree, then installed with its extras into a fresh venv. Dependencies
# come as binary wheels only: the build stage needs no compiler either.
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
 && python3 -m venv /opt/broker \
 && /opt/broker/bin/pip install --only-binary=:all: "$(ls /tmp/wheels/credential_broker-*.whl)[${EXTRAS}]" \
 && /opt/broker/bin/pip uninstall --yes pip setuptools \
 && /opt/broker/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/broker/lib \
 && /opt/broker/bin/broker version

FROM ${BASE}
ARG BASE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="credential-broker" \
      org.opencontainers.image.description="Sidecar credential broker for Apache Airflow on Kubernetes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}"
# Take away what an attacker inside the container could use to add software or gain privileges: package
# managers, pip, ensurepip and the wheels it would install, and every setuid/setgid bit. dpkg's status
# database stays so image scanners can still list the installed packages.
RUN rm -rf /usr/bin/apt /usr/bin/apt-* /usr/bin/dpkg /usr/bin/dpkg-* /usr/lib/apt /var/lib/apt /var/cache/apt \
           /usr/bin/pip* /usr/local/bin/pip* /usr/share/python-wheels \
           /usr/lib/python3*/ensurepip /usr/local/lib/python3*/ensurepip \
           /usr/local/lib/python3*/site-packages/pip /usr/local/lib/python3*/site-packages/setuptools \
 && find / -xdev -type f -perm /6000 -exec chmod a-s {} + \
 && install -d -m 0770 -o 65532 -g 0 /run/broker \
 && install -d -m 0755 /etc/broker
COPY --from=build /opt/broker /opt/broker
# MALLOC_ARENA_MAX: the SDK calls run in the broker's thread pool, and glibc otherwise gives each thread a heap
# arena of its own whose freed pages stay with the process (docs/footprint.md has the figures).
ENV PATH=/opt/broker/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2
USER 65532:65532
WORKDIR /run/broker
# The metrics listener (/metrics, /healthz, /readyz). The secrets API is the unix socket in /run/broker only.
EXPOSE 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["broker", "serve"]
CMD ["--config", "/etc/broker/broker.yaml"]
