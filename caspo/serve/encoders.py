"""CaT's answers on the wire: JSON (``/v1/solve``, NDJSON, OpenAI chat completions and their chunks) and
protobuf (``protos/caspo/v1/cat.proto``). Field names are the same in both; the request bodies are
schemas.py."""

from __future__ import annotations

import math
import time
import uuid

from caspo.core.search import CommittedStep, SearchConfig, SearchResult, TreeUpdate
from caspo.protos.v1 import cat_pb2
from caspo.serve.params import SolveParams


# ---- JSON ------------------------------------------------------------------------------------------
def result_json(res: SearchResult, steps: list[CommittedStep], params: SolveParams, version: int, seconds: float) -> dict:
    """The JSON answer (``/v1/solve``, and ``caspo`` in chat completions); field names match cat.proto."""
    out = {
        "answer": res.answer,
        "has_answer": res.answer is not None,
        "reason": res.reason,
        "confidence": res.confidence,
        "entropy_confidence": res.entropy_confidence,
        "steps": [step_json(s) for s in steps],
        "policy_version": version,
        "method": res.method,
        "scoring": res.scoring,
        "k": params.search.k,
        "tau": params.search.tau,
        "steps_proposed": res.steps_proposed,
        "tokens_generated": res.tokens_generated,
        "branches_pruned": res.branches_pruned,
        "seconds": seconds,
    }
    if params.with_tree:
        out["tree"] = res.tree
    return out


def step_json(step: CommittedStep) -> dict:
    return dict(step.__dict__)


def tree_json(update: TreeUpdate) -> list[dict]:
    """A tree update's nodes (``Node.to_dict``: id, parent (0: the question), step, depth, c, C, status,
    reason, uncertainty, ...)."""
    return list(update.nodes)


def search_json(cfg: SearchConfig) -> dict:
    """The search a request runs, every field resolved (an infinite branch_threshold as "inf", as in
    calibration files: JSON has no infinity)."""
    out = dict(cfg.__dict__)
    out["branch_threshold"] = "inf" if math.isinf(cfg.branch_threshold) else cfg.branch_threshold
    return out


def chat_content(res: SearchResult, delimiter: str = "\n") -> str:
    """The assistant message: the steps, each after the first preceded by the step delimiter, and the
    reason when the search found no answer. A stream's deltas add up to exactly this."""
    return delimiter.join(res.steps) if res.answer is not None else delimiter.join([*res.steps, f"({res.reason})"])


def chat_completion(model_id: str, res: SearchResult, answer: dict, prompt_tokens: int, delimiter: str = "\n") -> dict:
    """An OpenAI ``chat.completion``: the steps as the message, the JSON answer under ``caspo``."""
    content = chat_content(res, delimiter)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": res.tokens_generated, "total_tokens": prompt_tokens + res.tokens_generated},
        "caspo": answer,
    }


def chat_chunk(completion_id: str, created: int, model_id: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    """One OpenAI ``chat.completion.chunk`` of a streamed reply (``stream: true``); ``extra``: top-level
    fields of the last chunk (``caspo``, ``usage``)."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model_id,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }


def models_list(model_id: str, version: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "caspo", "policy_version": version}]}


# ---- protobuf --------------------------------------------------------------------------------------
def step_proto(s: CommittedStep) -> cat_pb2.SolvedStep:
    return cat_pb2.SolvedStep(index=s.index, text=s.text, confidence=s.confidence, cumulative=s.cumulative, mean_entropy=s.mean_entropy)


def response_proto(res: SearchResult, steps: list[CommittedStep], params: SolveParams, version: int, seconds: float) -> cat_pb2.SolveResponse:
    tree = [
        cat_pb2.TreeNode(id=i + 1, parent=n["parent"], step=n["step"], depth=n["depth"], c=n["c"], cumulative=n["C"], status=n["status"])
        for i, n in enumerate(res.tree)
    ]
    return cat_pb2.SolveResponse(
        answer=res.answer or "",
        has_answer=res.answer is not None,
        reason=res.reason,
        confidence=res.confidence,
        entropy_confidence=res.entropy_confidence,
        steps=[step_proto(s) for s in steps],
        policy_version=version,
        method=res.method,
        scoring=res.scoring,
        k=params.search.k,
        tau=params.search.tau,
        steps_proposed=res.steps_proposed,
        tokens_generated=res.tokens_generated,
        branches_pruned=res.branches_pruned,
        tree=tree,
        seconds=seconds,
    )
