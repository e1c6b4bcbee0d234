"""llama-mesh server: API server, control plane, orchestrator, workflow workers, gateway."""
