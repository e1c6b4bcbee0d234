"""The API server: deployments, tasks, sessions and events, served over gRPC."""
