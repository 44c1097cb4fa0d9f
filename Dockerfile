# fedq services image (CPU): the entry point is the fedq command, e.g. `docker run fedq worker --help`.
# Build: docker build -t fedq .   (compose.yaml builds it for every fedq service)
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 FEDQ_LOG_JSON=true
# torch first, the CPU build: fedq's own install then finds it in place
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
# one COPY per package of [tool.setuptools] packages in pyproject.toml (tests/test_compose.py checks)
COPY shared shared
COPY broker_config broker_config
COPY coordinator coordinator
COPY aggregator aggregator
COPY worker worker
COPY fedq fedq
RUN pip install --no-cache-dir .
# MNIST-1D is generated, never downloaded: do it once here instead of in every container
RUN python -c "from fedq.apps.mnist1d import load_arrays; load_arrays()"
ENTRYPOINT ["fedq"]
