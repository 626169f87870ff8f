"""CaT inference on Ray Serve, split as vLLM splits an endpoint (see README's Layout).

Empty on purpose: Serve's proxies import ``caspo.serve.proxy`` and must not load a model stack.
"""
