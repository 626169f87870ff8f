"""gRPC servers and clients for the mesh's actors, and the Ray Serve CaT application."""
