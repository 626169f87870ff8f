"""The CaT service a Serve replica runs: one object that the HTTP routes (http_app.py) and the gRPC methods
(deployment.py) both call, as vLLM's ``OpenAIServingChat`` sits under its routes. It holds the model
behind a micro-batching ``ModelWorker``, the task, the prompter, the calibration and the policy
watcher, and answers in typed values (``SearchResult``, ``CommittedStep``) that the endpoints encode
(encoders.py). Bad input raises the errors of request_errors.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import torch

from caspo import telemetry
from caspo.config import Config
from caspo.core.search import CommittedStep, Search, SearchResult, TreeUpdate, stream_search
from caspo.models.base import ModelLoadError, item_tokens, prefix_text
from caspo.models.calibration_file import Calibration, CalibrationError, find_calibration
from caspo.models.factory import make_backend
from caspo.models.prompting import prompter_for_backend
from caspo.models.worker import ModelWorker, subscribe
from caspo.policy_file import read_policy_file, read_policy_info
from caspo.serve.encoders import chat_chunk, chat_completion, models_list, result_json
from caspo.serve.params import SolveParams, params_from_body, params_from_grpc
from caspo.serve.request_errors import ModelNotFound, ParamError
from caspo.tasks import get_task

log = logging.getLogger(__name__)

Answer = tuple[SearchResult, list[CommittedStep], int, float]  # result, committed steps, policy version, seconds


class _RequestProposer:
    """CaT's StepProposer over the replica's ModelWorker, for one request: it remembers which policy
    version wrote the request's latest proposals."""

    def __init__(self, worker, prompt, delimiter: str):
        self.worker, self.prompt, self.delimiter = worker, prompt, delimiter
        self.version = worker.version

    async def propose(self, prefixes, n: int, temperature: float):
        texts = [prefix_text(self.prompt, p.question, p.steps, self.delimiter) for p in prefixes]
        out, self.version = await self.worker.sample_steps_versioned(texts, n, temperature, [p.seed for p in prefixes])
        return out


def check_context(question: str, worker: ModelWorker, prompter) -> str:
    """``question``, or ParamError on the field question naming the limit when its prompt and one step
    (model.max_step_tokens) do not fit the model's context length."""
    limit = worker.max_model_len
    if limit:
        need = item_tokens(worker.backend, prompter(question))
        if need > limit:
            raise ParamError("question", f"needs {need} tokens with room for one step (model.max_step_tokens); the model's context length (model.max_model_len) is {limit}")
    return question


class CaTService:
    """One replica's CaT: solve (whole or streamed) and chat (whole or streamed), over one model."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        sv = self.cfg.serve
        torch.set_num_threads(max(1, int(sv.num_cpus)))
        path, version = self.cfg.model.policy, 0
        published = self._published()
        if published is not None:
            version, path = published
        self.worker = ModelWorker(make_backend(self.cfg, path, version), batch_wait_ms=sv.batch_wait_ms, name="serve")
        subscribe(self.worker, self._published_over_transport)  # publishes over the tensor transport land here
        telemetry.policy_version("serve", version)
        self.task = get_task(self.cfg.task.name, self.cfg.task.data, self.cfg.task)
        self.prompter = prompter_for_backend(self.worker.backend, self.task)  # model.prompt_format, step_delimiter
        self.calibration = self._calibration(path, strict=True)
        self.model_id = f"caspo-{self.cfg.task.name}"
        self._watcher: asyncio.Task | None = None
        self.reload_error: str | None = None
        self._failed: tuple[int, str] | None = None  # a publication that failed to load: not retried
        try:
            self._start_watcher()
        except RuntimeError:  # no running loop here; the first request starts it
            pass

    # ---- policy ------------------------------------------------------------------------------
    def _published(self) -> tuple[int, str] | None:
        pf = self.cfg.serve.policy_file
        return read_policy_file(pf) if pf else None

    def _start_watcher(self) -> None:
        if self.cfg.serve.policy_file and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.serve.watch_interval_s)
            published = self._published()
            if published is None or published[0] == self.worker.version or published == self._failed:
                continue
            version, path = published
            log.info("policy v%d published at %s: reloading", version, path)
            try:
                await self.worker.reload(path, version)
                telemetry.policy_version("serve", self.worker.version)
                self.reload_error = None
                self.calibration = self._calibration(path, strict=False)
            except Exception as e:  # noqa: BLE001 - keep serving the weights we have
                self._failed = published
                self.reload_error = f"reloading v{version} from {path} failed: {e}"
                log.error(self.reload_error)

    def _published_over_transport(self, plan: dict) -> None:
        """After a publish over the transport (caspo/mesh/publisher.py) switched the worker: the
        calibration that goes with the new policy."""
        self.reload_error = None
        self.calibration = self._calibration(plan["path"], strict=False)

    def _calibration(self, policy_path: str, strict: bool) -> Calibration | None:
        """cat.calibration (must exist), else the calibration next to the served policy when there is one.
        A malformed file stops a starting replica (``strict``) with its one-line message; after a reload it
        is reported as the reload error and cat requests use the cat section alone."""
        try:
            return find_calibration(self.cfg.cat.calibration, policy_path)
        except (CalibrationError, ModelLoadError) as e:
            if strict:
                raise
            self.reload_error = str(e)
            log.error(self.reload_error)
            return None

    def question_of(self, text: str) -> str:
        """The task's question from what a person typed, refused (ParamError: HTTP 422 / gRPC
        INVALID_ARGUMENT, naming the limit) when its prompt and one step do not fit the model's context."""
        return check_context(self.task.question(text), self.worker, self.prompter)

    def search_defaults(self) -> dict:
        """What a request's unset fields fall back on beyond serve.*: the cat section and the calibration."""
        return {"cat": self.cfg.cat, "calibration": self.calibration}

    # ---- the search --------------------------------------------------------------------------
    def _proposer(self) -> _RequestProposer:
        self._start_watcher()
        return _RequestProposer(self.worker, self.prompter, self.worker.delimiter)

    async def events(self, params: SolveParams, tree_events: bool = False):
        """Committed steps as the search makes them (with ``tree_events``, also a ``TreeUpdate`` after each
        model call), then (result, steps, version, seconds)."""
        t0 = time.perf_counter()
        proposer = self._proposer()
        steps: list[CommittedStep] = []
        async for ev in stream_search(Search(params.question, params.search), proposer, with_tree=params.with_tree, tree_events=tree_events):
            if isinstance(ev, CommittedStep):
                steps.append(ev)
                yield ev
            elif isinstance(ev, TreeUpdate):
                yield ev
            else:
                telemetry.cat_answer("serve", ev.tokens_generated, ev.branches_pruned)
                yield ev, steps, proposer.version, time.perf_counter() - t0

    async def solve(self, params: SolveParams) -> tuple[SearchResult, list[CommittedStep], int, float]:
        final = None
        async for ev in self.events(params):
            if not isinstance(ev, CommittedStep):
                final = ev
        return final

    # ---- what the endpoints ask -------------------------------------------------------------
    def prompt_tokens(self, question: str) -> int:
        backend = self.worker.backend
        return len(backend.tokenizer(self.prompter(question))["input_ids"]) if hasattr(backend, "tokenizer") else 0

    def promotion(self) -> dict | None:
        """The latest promotion decision of the policy file (the gate's, or an operator's promote or
        rollback), with its reason; None without a policy file."""
        pf = self.cfg.serve.policy_file
        info = read_policy_info(pf) if pf else None
        if info is None:
            return None
        return {"published_version": info["version"], "decision": info.get("decision"), "previous_versions": [h["version"] for h in info.get("history", [])]}

    def health(self) -> dict:
        self._start_watcher()
        return {
            "status": "ok",
            "policy_version": self.worker.version,
            "policy_path": self.worker.path,
            "reload_error": self.reload_error,
            "calibration": self.calibration.path if self.calibration else None,
            "model_calls": self.worker.backend_calls,  # batched model calls so far
            "proposals_waiting": self.worker.in_flight,  # searches waiting on a model call right now
            "promotion": self.promotion(),
        }

    def models(self) -> dict:
        return models_list(self.model_id, self.worker.version)

    # ---- requests -----------------------------------------------------------------------------
    def solve_params(self, question, body) -> SolveParams:
        """A JSON body's parameters (``question`` given apart: a chat's is its last user message)."""
        return params_from_body(self.cfg.serve, question, body, self.question_of, **self.search_defaults())

    def grpc_params(self, request) -> SolveParams:
        """A ``caspo.v1.SolveRequest``'s parameters."""
        return params_from_grpc(self.cfg.serve, request, self.question_of, **self.search_defaults())

    def chat_params(self, body) -> SolveParams:
        """An OpenAI chat completion request's parameters: the question is its last user message."""
        if body.model != self.model_id:
            raise ModelNotFound(body.model, self.model_id)
        if body.n != 1:
            msg = f"must be 1 (one answer per request; use method sc or k for more samples), got {body.n}"
            raise ParamError("n", msg, text=msg)
        users = [m.content for m in body.messages if m.role == "user"]
        if not users:
            msg = "must contain a message with role 'user' (the question)"
            raise ParamError("messages", msg, text=msg)
        try:
            return self.solve_params(users[-1], body)
        except ParamError as e:
            if e.field == "question":  # the question is the last user message here
                raise ParamError("messages", e.message, text=str(e).replace("question", "the last user message", 1)) from None
            raise

    async def chat(self, params: SolveParams) -> dict:
        """An OpenAI ``chat.completion``: the steps as the message, the JSON answer under ``caspo``."""
        res, steps, version, seconds = await self.solve(params)
        return chat_completion(self.model_id, res, result_json(res, steps, params, version, seconds), self.prompt_tokens(params.question), self.prompter.delimiter)

    async def stream_chat(self, params: SolveParams):
        """The ``chat.completion.chunk`` objects of a streamed chat completion: a first chunk with the role,
        one chunk per committed step (its text, after the step delimiter from the second on), then the
        last chunk with ``finish_reason`` and the ``caspo`` answer object (and usage). The deltas add up to
        the non-streamed message."""
        delimiter = self.prompter.delimiter
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        yield chat_chunk(cid, created, self.model_id, {"role": "assistant", "content": ""})
        async for ev in self.events(params):
            if isinstance(ev, CommittedStep):
                text = ev.text if ev.index == 0 else delimiter + ev.text
                yield chat_chunk(cid, created, self.model_id, {"content": text})
                continue
            res, steps, version, seconds = ev
            tail = "" if res.answer is not None else (delimiter if steps else "") + f"({res.reason})"
            prompt_tokens = self.prompt_tokens(params.question)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": res.tokens_generated, "total_tokens": prompt_tokens + res.tokens_generated}
            answer = result_json(res, steps, params, version, seconds)
            yield chat_chunk(cid, created, self.model_id, {"content": tail} if tail else {}, "stop", caspo=answer, usage=usage)

    def check(self) -> None:
        """Raise when the policy watcher died (Serve then restarts the replica)."""
        if self._watcher is not None and self._watcher.done() and not self._watcher.cancelled() and self._watcher.exception():
            raise RuntimeError(f"policy watcher died: {self._watcher.exception()}")
