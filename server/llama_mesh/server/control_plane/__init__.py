"""The control plane: state store (``store``) and its gRPC service (``servicer``)."""
