"""The mesh: Ray actors hosting the gRPC services, the registry, the launcher and the client."""
