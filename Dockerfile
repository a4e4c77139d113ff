# embedplatform's image: CPU-only torch, for linux/amd64 and linux/arm64 (Oracle's Ampere A1):
#   docker buildx build --platform linux/amd64,linux/arm64 -t embedplatform .
# The model is not in the image: it is downloaded on first start into the /data/hf volume (the
# bundled all-MiniLM-L6-v2 is, and serves when MODEL_NAME is empty or unset).
# Build arguments: PYTHON_IMAGE (the base image) and TORCH_INDEX_URL (PyTorch's CPU index, or a
# mirror of it where only that is reachable). No `# syntax=` line: the engine's own BuildKit and
# the legacy builder both build this file without fetching a frontend image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- Build: a virtual environment with every dependency --------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements.txt ./
# torch first, from PyTorch's CPU-only index (wheels for x86_64 and aarch64): the requirements'
# torch==2.13.0 is then already met, so pip never pulls a multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install --no-cache-dir -r requirements.txt

# --- Run: the environment and the code, as an unprivileged user --------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PORT=8000 \
    HF_HOME=/data/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DATA_DIR=/data/app \
    STATIC_ROOT=/app/staticfiles \
    PROMETHEUS_MULTIPROC_DIR=/tmp/embedplatform-metrics \
    MALLOC_ARENA_MAX=2
# MALLOC_ARENA_MAX: glibc otherwise gives each thread its own heap arena, and a worker's RSS grows
# by gigabytes under large requests and never shrinks; two arenas keep it near its working set.
RUN groupadd --system --gid 10001 embed \
    && useradd --system --uid 10001 --gid embed --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin embed \
    && mkdir -p /data/hf /data/app /tmp/embedplatform-metrics \
    && chown -R embed:embed /data /tmp/embedplatform-metrics
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY . .
# Static files are collected at build time. Throwaway secrets and data folder: otherwise settings
# would generate a secret into the image, shared by everyone who runs it.
RUN SECRET_KEY=collectstatic-only SUPABASE_JWT_SECRET=collectstatic-only DATA_DIR=/tmp/build \
        python manage.py collectstatic --noinput --verbosity 0 \
    && rm -rf /tmp/build \
    && chmod 0755 docker/entrypoint.sh
# Numeric, so that a platform can verify it is not root without reading /etc/passwd.
USER 10001:10001
# The model cache and the app's data (the SQLite database and the generated secrets of the
# embedded default) outlive the container: compose mounts named volumes here, and
# `docker run -v embedplatform-data:/data/app -v embedplatform-models:/data/hf` does the same.
VOLUME ["/data/hf", "/data/app"]
EXPOSE 8000
# /health answers 200 once the model is loaded and the database (and Redis) answer. The start
# period covers the first start's model download.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
# The entrypoint migrates, fetches the model, then execs the command: gunicorn becomes PID 1 and
# receives SIGTERM itself, so `docker stop` lets the requests in flight finish.
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["gunicorn", "--config", "/app/embedplatform/gunicorn.conf.py"]
