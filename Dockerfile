# xlaserve serving image: `xlaserve serve` on 0.0.0.0, HTTP 8000, gRPC 8001, metrics 8002.
#
#   docker build -t xlaserve:0.1.0 .                                     # CPU
#   docker build --build-arg VARIANT=cuda -t xlaserve:0.1.0-cuda .       # NVIDIA GPU (CUDA 12)
#   docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -v "$PWD/repo:/models:ro" xlaserve:0.1.0 --model-repository /models
#
# Arguments after the image name go to `xlaserve serve` (see `xlaserve serve --help`). No model
# repository is baked in: mount one (Kubernetes: a volume; KServe: /mnt/models). Without
# --model-repository the server builds the demo models on first start into
# /var/cache/xlaserve, serving each as soon as it is built. Podman needs `--format docker` to keep the HEALTHCHECK.
#
# Without a registry (no debian image to pull): tools/make_base_image.sh builds the base from
# Debian packages, then add --build-arg BASE_IMAGE=localhost/xlaserve-base:bookworm.
# Any Debian bookworm base works (its python3 is 3.11, which pyproject.toml requires).
ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------
# builder: compilers and grpc++ headers; the package and its dependencies go into a venv, and
# setup.py builds the native C++ gRPC front end (serving/frontend/_native) against grpc++.
FROM ${BASE_IMAGE} AS builder
ARG VARIANT=cpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ make \
      pkg-config libgrpc++-dev rapidjson-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/xlaserve
ENV PATH=/opt/xlaserve/bin:$PATH

# Dependencies first, from pyproject.toml alone, so a source change does not download them again.
COPY pyproject.toml /src/
RUN case "$VARIANT" in \
      cpu) extras= ;; \
      cuda) extras=cuda ;; \
      *) echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 1 ;; \
    esac \
 && python3 -c 'import sys, tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + (p["optional-dependencies"][sys.argv[1]] if sys.argv[1] else [])))' \
      "$extras" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

COPY setup.py README.md /src/
COPY bundle /src/bundle
COPY demo /src/demo
COPY export /src/export
COPY models /src/models
COPY pallas_kernels /src/pallas_kernels
COPY serving /src/serving
COPY sharding /src/sharding
# XLASERVE_REQUIRE_NATIVE=1: a failed C++ build fails the image instead of falling back to the
# Python front end. Stripped: its debug information is most of its 19 MB.
RUN XLASERVE_REQUIRE_NATIVE=1 pip install --no-deps /src \
 && cd / && so=$(python3 -c "import serving.frontend._native as m; print(m.__file__)") \
 && strip --strip-unneeded "$so" \
 && for lib in $(ldd "$so" | awk '$2 == "=>" && $3 ~ /^\// {print $3}'); do \
      dpkg -S "*/$(basename "$(readlink -f "$lib")")" | cut -d: -f1; \
    done | sort -u > /opt/xlaserve/runtime-packages.txt \
 && echo "native front end links against: $(tr '\n' ' ' < /opt/xlaserve/runtime-packages.txt)"

# ---------------------------------------------------------------------------------------------
# runtime: the interpreter, the shared libraries the native front end links against (found by
# ldd in the builder), the venv, and an unprivileged user.
FROM ${BASE_IMAGE} AS runtime
ARG VARIANT=cpu
ENV DEBIAN_FRONTEND=noninteractive
COPY --from=builder /opt/xlaserve/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 $(cat /tmp/runtime-packages.txt) \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt
RUN groupadd --gid 1000 xlaserve \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/xlaserve \
      --shell /usr/sbin/nologin xlaserve \
 && mkdir -p /var/cache/xlaserve \
 && chown xlaserve:xlaserve /var/cache/xlaserve
COPY --from=builder /opt/xlaserve /opt/xlaserve
# Every library the native front end needs is here (else the server would fall back to Python).
RUN cd / && /opt/xlaserve/bin/python3 -c "import serving.frontend._native"

LABEL org.opencontainers.image.title="xlaserve" \
      org.opencontainers.image.description="JAX/XLA inference server speaking the KServe v2 / Triton protocol" \
      org.opencontainers.image.version="0.1.0" \
      ai.xlaserve.variant="${VARIANT}"
# XLASERVE_HOME: where demo models are built when no --model-repository is given.
# NVIDIA_DRIVER_CAPABILITIES: what the NVIDIA container runtime mounts (cuda variant).
ENV PATH=/opt/xlaserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XLASERVE_HOME=/var/cache/xlaserve \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 1000:1000
WORKDIR /home/xlaserve
# HTTP/REST (KServe v2), gRPC (KServe v2 / Triton), Prometheus metrics
EXPOSE 8000 8001 8002
# Ready once every model is loaded and warmed up (every bucket compiled): give big models time.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20m --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["xlaserve", "serve", "--host", "0.0.0.0", "--compile-cache", "/var/cache/xlaserve/jax"]
