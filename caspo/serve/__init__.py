"""CaT inference on Ray Serve, split as vLLM splits an endpoint (see README's Layout).

Empty on purpose: Serve's gRPC proxy imports ``caspo.serve.grpc_proxy`` and must not load a model stack.
"""
