# The llama-mesh image used by docker-compose.yml (API server, workers, gateway config).
FROM python:3.11-slim
WORKDIR /app
COPY client/ client/
COPY server/ server/
COPY examples/ examples/
RUN pip install --no-cache-dir ./client ./server
EXPOSE 50051
CMD ["llamactl", "serve", "--host", "0.0.0.0"]
