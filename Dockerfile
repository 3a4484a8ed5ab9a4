# One image for every service of docker-compose.yml; each runs a `recsys <command>` entry point,
# the same ones the tests start natively.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY recsys recsys
COPY streams streams
COPY inference inference
COPY vector_store vector_store
COPY serving serving
COPY proto proto
RUN pip install --no-cache-dir .
ENV RECSYS_INFERENCE__MODEL_DIR=/models
ENTRYPOINT ["recsys"]
