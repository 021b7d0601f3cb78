# streamapp worker image. Build context: the repository root (see .dockerignore).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Project metadata and sources; `pip install .` pulls the dependencies from PyPI.
COPY . /app
RUN pip install . \
    && useradd --system --create-home --uid 10001 streamapp \
    && mkdir -p /var/lib/streamapp \
    && chown streamapp /var/lib/streamapp

USER streamapp

# Per-container state (RocksDB tables): every scaled replica has its own filesystem.
# The 0.0.0.0 bind needs STREAMAPP_READ_TOKEN at run time (no default baked into the image: the
# worker refuses to start without one, naming the variable).
ENV STREAMAPP_DATA_DIR=/var/lib/streamapp \
    STREAMAPP_WEB_HOST=0.0.0.0 \
    STREAMAPP_WEB_PORT=6066

EXPOSE 6066

# python, not curl: the slim image has no curl. Follows STREAMAPP_WEB_PORT if it is overridden.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAMAPP_WEB_PORT', '6066'), timeout=4)"

CMD ["streamapp", "worker"]
