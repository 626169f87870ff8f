"""The errors a CaT replica raises to Serve's proxies, and the stand-in for a request the proxy could not
parse. Ray pickles them between the replica and the proxy, and unpickling one imports the module that
defines it: this module imports nothing of the model stack (torch, transformers) or of FastAPI and
Ray, so the proxies stay light (tests/unit/test_serve_config.py checks)."""

from __future__ import annotations

from caspo.errors import BadRequest, NotFound


class UndecodableRequest:
    """Stands in for a request the proxy could not parse; Serve pickles it to the replica."""

    def __init__(self, error: str):
        self.error = error


class ParamError(BadRequest):
    """A request field out of its limits; ``field`` names it (HTTP 422 ``loc``, gRPC details). The text is
    ``"<field> <message>"`` unless ``text`` words it otherwise."""

    def __init__(self, field: str, message: str, text: str | None = None):
        self.field, self.message = field, message
        self.text = text if text is not None else f"{field} {message}"
        super().__init__(self.text)

    def __reduce__(self):  # Ray pickles exceptions between the replica and the proxy
        return (ParamError, (self.field, self.message, self.text))


class ModelNotFound(NotFound):
    """A chat completion for a model this server does not serve (HTTP 404, OpenAI's ``model_not_found``)."""

    def __init__(self, model: str, served: str):
        super().__init__(f"model {model!r} is not served here; GET /v1/models lists {served!r}")
        self.model, self.served = model, served

    def __reduce__(self):
        return (ModelNotFound, (self.model, self.served))


class Unauthenticated(PermissionError):
    """The call carried no or the wrong bearer token (gRPC UNAUTHENTICATED)."""

    def __reduce__(self):
        return (Unauthenticated, self.args)
