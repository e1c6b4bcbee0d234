# The llama-mesh image used by docker-compose.yml (API server, workers, gateway config).
FROM python:3.11-slim
WORKDIR /app
COPY client/ client/
COPY server/ server/
COPY examples/ examples/
RUN pip install --no-cache-dir ./client ./server
EXPOSE 50051
# On 0.0.0.0, serve refuses to start without API keys (LLAMA_MESH_API_KEYS,
# LLAMA_MESH_ADMIN_KEYS) unless LLAMA_MESH_INSECURE_NO_AUTH=1 says to serve without them.
CMD ["llamactl", "serve", "--host", "0.0.0.0"]
