# The kiban gateway image; `kiban gpu-exporter` runs from it too.
#   docker build -t kiban-gateway:0.1.0 .     (kiban compose writes this build for you)
# Two stages: the first builds a virtual environment with kiban and its pinned
# dependencies, the second copies only that onto the same slim base and runs it
# as an unprivileged user. The base is pinned by tag and digest; PYTHON_IMAGE
# lets a mirror (or a local base image) take its place.
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c

FROM ${PYTHON_IMAGE} AS build
ENV VENV=/opt/kiban \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# A C compiler and xxhash.h for the C kernel of cache_aware (setup.py), in this stage only:
# the kernel inlines xxh3 and needs no library at run time. Debian's own
# versions of the base's release (bookworm); pinning them would break the build at each point
# release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libxxhash-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY src ./src
RUN python3 -m venv "$VENV" \
    && "$VENV/bin/pip" install --no-compile . \
    && "$VENV/bin/kiban" --help > /dev/null \
    && "$VENV/bin/python" -c "from kiban.gateway.prefix_scan import NATIVE; assert NATIVE"

FROM ${PYTHON_IMAGE}
ENV VENV=/opt/kiban
ENV PATH="$VENV/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/kiban /opt/kiban
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin kiban
USER 10001:10001
EXPOSE 8080
# KIBAN_HEALTH_URL when the gateway listens elsewhere than port 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "kiban.healthcheck"]
ENTRYPOINT ["kiban"]
CMD ["serve", "-c", "/etc/kiban/kiban.yaml"]
