"""Generated protobuf and gRPC code of the llama_mesh.v1 contracts (scripts/gen.py)."""
