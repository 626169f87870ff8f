"""gRPC servicers of the mesh's services, and what their servers and channels share."""
