# syntax=docker/dockerfile:1
# d4m-infer in a container: folder jobs (d4m-infer run) and the DICOM listener (d4m-infer serve).
#
#   CPU image (default): Python slim + the d4m runtime; no PyTorch, no compilers.
#     docker build -t d4m-infer .
#   GPU image: CUDA + cuDNN base, onnxruntime-gpu and TensorRT (the `gpu` extra).
#     docker build --build-arg VARIANT=gpu -t d4m-infer:gpu .
#
# Mount the bundle read-only at /bundle; /in (studies), /out (results) and /spool (the listener's
# spool) are volumes. The final stage's install steps are docker/install-runtime.sh, which
# tests/test_dockerfile.py also runs (with the builder's RUN line) in a clean virtual environment.

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG VARIANT=cpu

# ---- builder: the d4m wheel (pure Python). The only stage that sees the source tree.
FROM python:${PYTHON_VERSION}-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dicom_io/ dicom_io/
COPY runtime/ runtime/
COPY training/ training/
COPY export/ export/
RUN python -m pip wheel --no-deps --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

# ---- the two bases of the final image
FROM python:${PYTHON_VERSION}-slim AS base-cpu

FROM ${CUDA_IMAGE} AS base-gpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# ---- final image: the runtime in /opt/d4m, run as a non-root user
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
ENV PATH=/opt/d4m/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=builder /wheels /tmp/wheels
COPY docker/install-runtime.sh /tmp/install-runtime.sh
RUN python3 -m venv /opt/d4m \
 && sh /tmp/install-runtime.sh /tmp/wheels "${VARIANT}" \
 && rm -rf /tmp/wheels /tmp/install-runtime.sh
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/d4m d4m \
 && mkdir -p /bundle /in /out /spool \
 && chown d4m:d4m /out /spool
USER 10001:10001
WORKDIR /home/d4m
VOLUME ["/in", "/out", "/spool"]
EXPOSE 11112
# The listener writes /spool/heartbeat.json every 5 s; a folder job has none: run it with --no-healthcheck.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["d4m-infer", "status", "--spool", "/spool", "--health", "--max-age", "60"]
ENTRYPOINT ["d4m-infer"]
CMD ["--help"]
