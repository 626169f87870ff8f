"""One CaT request's parameters, filled from ``serve.*`` defaults and checked against its limits the
same way whether the request came over gRPC or HTTP."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from caspo.config import CatConfig, ServeConfig
from caspo.models.calibration_file import Calibration
from caspo.core.search import BRANCHINGS, METHODS, SearchConfig
from caspo.core.confidence import INTRINSIC
from caspo.serve.request_errors import ParamError, UndecodableRequest
from caspo.tasks.base import TaskError


@dataclass(frozen=True)
class SolveParams:
    question: str
    search: SearchConfig
    with_tree: bool = False


SEARCH_FIELDS = ("method", "k", "tau", "max_steps", "temperature", "scoring", "seed", "branching", "branch_threshold")
SERVED_SCORINGS = INTRINSIC  # critic needs a verifier per step: a yardstick of the benchmarks, not served


def _number(field: str, value, lo, hi, integer: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ParamError(field, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if isinstance(value, float) and math.isnan(value):
        raise ParamError(field, "must be a number, got nan")
    if not lo <= value <= hi:
        raise ParamError(field, f"must be in [{lo}, {hi}], got {value}")
    return value


def parse_params(
    sv: ServeConfig,
    question: Any,
    method: Any = None,
    k: Any = None,
    tau: Any = None,
    max_steps: Any = None,
    temperature: Any = None,
    scoring: Any = None,
    seed: Any = None,
    branching: Any = None,
    branch_threshold: Any = None,
    with_tree: bool = False,
    question_of: Callable[[str], str] | None = None,
    cat: CatConfig | None = None,
    calibration: Calibration | None = None,
) -> SolveParams:
    """Fill defaults from ``serve.*`` (a ``cat`` request: from the ``cat`` section and the policy's
    calibration, when given) and check every field against its limit (``ParamError``).
    ``question_of`` (the served task's ``question``) turns what a person typed into what the policy
    sees, or refuses it with a message naming what the task accepts."""
    if not isinstance(question, str):
        raise ParamError("question", f"must be a string, got {type(question).__name__}")
    if not question.strip():
        raise ParamError("question", "is empty")
    if len(question) > sv.max_question_chars:
        raise ParamError("question", f"is {len(question)} characters; the limit is {sv.max_question_chars}")
    if "\x00" in question:
        raise ParamError("question", "contains a NUL character")
    if question_of is not None:
        try:
            question = question_of(question)
        except TaskError as e:
            raise ParamError("question", f"is not one the served model takes: {e}") from None
    method = sv.method if method is None else method
    if method not in METHODS:
        raise ParamError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if branching is not None and branching not in BRANCHINGS:
        raise ParamError("branching", f"must be one of {', '.join(BRANCHINGS)}, got {branching!r}")
    if branch_threshold is not None:
        branch_threshold = float(_number("branch_threshold", branch_threshold, 0.0, math.inf, integer=False))
    if method == "cat" and cat is not None:  # the recommended CaT, calibrated for the served policy
        d = cat.search_config(calibration, branching=branching)
    else:
        d = SearchConfig(method="cat", k=sv.k, tau=sv.tau, max_steps=sv.max_steps, scoring=sv.scoring, temperature=sv.temperature)
    scoring = d.scoring if scoring is None else scoring
    if scoring not in SERVED_SCORINGS:
        raise ParamError("scoring", f"must be one of {', '.join(SERVED_SCORINGS)}, got {scoring!r}")
    k = _number("k", d.k if k is None else k, 1, sv.max_k, integer=True)
    tau = float(_number("tau", d.tau if tau is None else tau, 0.0, 1.0, integer=False))
    max_steps = _number("max_steps", d.max_steps if max_steps is None else max_steps, 1, sv.max_max_steps, integer=True)
    temperature = float(_number("temperature", d.temperature if temperature is None else temperature, 0.0, sv.max_temperature, integer=False))
    if seed is not None:
        seed = _number("seed", seed, -(2**63), 2**63 - 1, integer=True)
    if method == "greedy":
        k, temperature = 1, 0.0
    elif k > 1 and temperature == 0:  # SearchConfig's rule, answered with the field's name
        raise ParamError("temperature", f"must be > 0 for method {method} with k > 1 (the k samples would be identical)")
    fields = dict(method=method, k=k, tau=tau, max_steps=max_steps, scoring=scoring, temperature=temperature, seed=seed)
    if method == "cat":
        fields.update(branching=d.branching if branching is None else branching, uncertainty=d.uncertainty, width=d.width,
                      prune_scoring=d.prune_scoring, window=d.window, branch_threshold=d.branch_threshold if branch_threshold is None else branch_threshold)
    cfg = SearchConfig(**fields)
    return SolveParams(question.strip(), cfg, bool(with_tree))


def params_from_grpc(sv: ServeConfig, request, question_of: Callable[[str], str] | None = None, **defaults) -> SolveParams:
    """A ``caspo.v1.SolveRequest`` (unset fields take the defaults), or the stand-in of one that did not parse."""
    if isinstance(request, UndecodableRequest):
        raise ParamError("request", f"does not parse as caspo.v1.SolveRequest: {request.error}")
    fields = {name: getattr(request, name) if request.HasField(name) else None for name in SEARCH_FIELDS}
    return parse_params(sv, request.question, with_tree=request.with_tree, question_of=question_of, **fields, **defaults)


def params_from_body(sv: ServeConfig, question: Any, body, question_of: Callable[[str], str] | None = None, **defaults) -> SolveParams:
    """An HTTP body's search fields (``schemas.SearchFields``) for ``question``. ``defaults``: ``cat`` and
    ``calibration`` for parse_params."""
    fields = {name: getattr(body, name) for name in SEARCH_FIELDS}
    return parse_params(sv, question, with_tree=body.with_tree, question_of=question_of, **fields, **defaults)
