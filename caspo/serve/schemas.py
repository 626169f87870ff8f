"""CaT's HTTP request bodies (pydantic, strict: a wrong JSON type is a 422 naming the field). Field names
match ``protos/caspo/v1/cat.proto``; the answers' encoders are encoders.py."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


# ---- HTTP bodies -----------------------------------------------------------------------------------
class SearchFields(BaseModel):
    """The search fields every solving endpoint takes (OpenAI extension fields on chat completions)."""

    model_config = ConfigDict(extra="forbid")

    method: StrictStr | None = None
    k: StrictInt | None = None
    tau: StrictFloat | StrictInt | None = None
    max_steps: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    scoring: StrictStr | None = None
    seed: StrictInt | None = None
    branching: StrictStr | None = None
    branch_threshold: StrictFloat | StrictInt | None = None
    with_tree: StrictBool = False


class SolveBody(SearchFields):
    question: StrictStr


class StreamBody(SolveBody):
    """``/v1/solve/stream``: with ``tree_events``, the stream also sends the search's configuration
    first and the tree as it grows (``search_json``, ``tree_json``)."""

    tree_events: StrictBool = False


class ChatMessage(BaseModel):
    role: StrictStr
    content: StrictStr


class ChatBody(SearchFields):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (top_p, user, ...)

    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    n: StrictInt = 1
    stream: StrictBool = False
    max_tokens: StrictInt | None = None  # accepted and ignored: a step budget is max_steps
