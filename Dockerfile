# fedq services image (CPU). Build: docker build -t fedq .
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY shared shared
COPY broker_config broker_config
COPY coordinator coordinator
COPY aggregator aggregator
COPY worker worker
COPY fedq fedq
RUN pip install --no-cache-dir .
ENV OMP_NUM_THREADS=1 FEDQ_LOG_JSON=true
ENTRYPOINT ["fedq"]
