"""vLLM backend (GPU workers only, extra ``gpu``): step sampling and teacher-forced scoring on ``vllm.LLM``.

Same contract as :class:`caspo.models.hf.HFBackend`, with one documented difference (docs/design.md §5,
"vLLM entropy"): vLLM hands back only the top-k log-probs of a position, not its logits, so every entropy this
backend reports is a **top-k estimate** from :func:`caspo.core.confidence.topk_entropy_estimate` with the
tail spread uniformly over the rest of the vocabulary (an upper bound that is close for peaked
distributions), and sampled steps carry ``entropy_estimate=True``. The exact value comes from the
ConfidenceScorer's prefill pass on the HF backend; the GPU integration tests hold the two against each
other. Token log-probs are exact: vLLM always returns the sampled (or, when scoring, the given) token's
own log-prob next to the top k.

vLLM APIs used (documented in vLLM's ``SamplingParams``/``LLM`` reference and its RLHF examples):

* ``LLM(model=..., gpu_memory_utilization=..., max_logprobs=..., worker_extension_cls=...)``;
* ``LLM.generate(prompts, sampling_params, use_tqdm=False)`` with token-id prompts
  (``{"prompt_token_ids": [...]}``) and one ``SamplingParams`` per prompt, outputs in input order;
* ``SamplingParams(n, temperature, seed, stop, include_stop_str_in_output, logprobs=k, prompt_logprobs=k,
  max_tokens)``; ``CompletionOutput.token_ids/.text/.logprobs/.finish_reason/.stop_reason`` where
  ``logprobs[t]`` is ``dict[token_id -> Logprob(logprob, rank, decoded_token)]`` holding the top k plus the
  sampled token, computed from the raw logits (before temperature — the V1 sampler's default
  ``raw_logprobs`` mode), and ``RequestOutput.prompt_logprobs`` (entry 0 is ``None``);
* ``LLM.collective_rpc(method, args=...)`` into a ``worker_extension_cls`` whose method calls the model's
  ``load_weights(weights=[(name, tensor), ...])`` (the in-place update of vLLM's RLHF examples), then
  ``LLM.reset_prefix_cache()`` so no KV block computed by the old weights is reused.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from caspo.config import SYSTEM_PROMPT
from caspo.core.contract import ProposedStep, derive_seed
from caspo.core.confidence import topk_entropy_estimate
from caspo.core.steps import DEFAULT_DELIMITER
from caspo.models.base import ModelLoadError, StepScore, context_length
from caspo.models.hf import first_tokens, resolve_model_path

log = logging.getLogger(__name__)

GPU_EXTRA = "the vllm backend needs the gpu extra: pip install 'caspo-mesh[gpu]'"


class WeightReloadExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``) so :meth:`VLLMBackend.reload` can swap the
    weights in place through ``LLM.collective_rpc``: no new engine, no second copy of the KV cache.

    Defined here, importable by its qualified name in vLLM's worker processes, and free of vLLM imports
    so this module still imports without the ``gpu`` extra. Full-precision (unquantized) checkpoints of
    the same architecture only: the parameters are overwritten where they are, which also keeps any
    captured CUDA graphs valid.
    """

    def caspo_load_safetensors(self, path: str) -> int:
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")

        def weights():
            for f in files:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    for name in st.keys():
                        yield name, st.get_tensor(name)

        self._caspo_model().load_weights(weights=weights())
        torch.cuda.synchronize()
        return len(files)

    def caspo_load_tensors(self, named: list) -> int:
        """One bucket of a publish over the transport (caspo.models.transport): ``(name, tensor)`` pairs
        handed to the model's ``load_weights``, which converts them to the engine's dtype and device."""
        self._caspo_model().load_weights(weights=iter(named))
        torch.cuda.synchronize()
        return len(named)

    def _caspo_model(self):
        runner = self.model_runner  # type: ignore[attr-defined]  (set by vLLM's worker)
        return runner.get_model() if hasattr(runner, "get_model") else runner.model


def _step_end(text: str, delimiter: str) -> int | None:
    """Index just past the first delimiter that follows non-whitespace content; None if there is none.

    A leading empty line (a delimiter before any content) does not end a step, as in the HF backend.
    """
    start = 0
    while True:
        k = text.find(delimiter, start)
        if k < 0:
            return None
        if text[:k].replace(delimiter, "").strip():
            return k + len(delimiter)
        start = k + len(delimiter)


def _step_text(text: str, delimiter: str) -> str:
    """The step without its delimiter, leading empty lines and surrounding whitespace (as HF's cut)."""
    end = _step_end(text, delimiter)
    body = text[: end - len(delimiter)] if end is not None else text
    body = body.strip()
    while delimiter.strip() and body.startswith(delimiter):  # a non-whitespace delimiter before content
        body = body[len(delimiter) :].strip()
    return body


@dataclass
class _Row:
    """One sample being generated: prompt ids, its seed, and what it has produced so far."""

    prompt_ids: list[int]
    seed: int | None
    tokens: list[int] = field(default_factory=list)
    ents: list[float] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    text: str = ""
    ended: bool = False


class VLLMBackend:
    """:class:`caspo.models.base.Backend` on ``vllm.LLM`` (one GPU replica).

    ``topk`` is how many log-probs vLLM returns per position (``max_logprobs`` is raised to match);
    ``llm_kwargs`` go to ``vllm.LLM`` unchanged (``dtype``, ``enforce_eager``, ``max_model_len``, ...).
    Calls are serialised by a lock: ``LLM`` is not thread-safe, and the lock is also what keeps a reload
    from touching a request that is running.
    """

    name = "vllm"

    def __init__(
        self,
        path: str = "tiny",
        version: int = 0,
        delimiter: str = DEFAULT_DELIMITER,
        max_step_tokens: int = 32,
        topk: int = 20,
        prompt_format: str = "plain",
        system_prompt: str = SYSTEM_PROMPT,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        **llm_kwargs: Any,
    ):
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        if not torch.cuda.is_available():
            raise ModelLoadError(f"{GPU_EXTRA} and a CUDA GPU (torch sees none)")
        try:
            import vllm  # only here: vllm is the optional gpu extra, and this module imports without it
        except ImportError as e:
            raise ModelLoadError(GPU_EXTRA) from e
        self._vllm = vllm
        self.delimiter = delimiter
        self.prompt_format = prompt_format  # chat: prompts come from the chat template, special tokens included
        self.system_prompt = system_prompt
        self.add_special_tokens = prompt_format == "plain"
        self.max_step_tokens = max_step_tokens
        self.topk = topk
        resolved = resolve_model_path(path)
        try:
            # the same tokenizer the HF backend uses, so both encode a prompt to the same ids
            self._tok = AutoTokenizer.from_pretrained(resolved)
            cfg = AutoConfig.from_pretrained(resolved)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load a model from {resolved}: {str(e).splitlines()[0]}") from e
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.vocab_size = int(getattr(text_cfg, "vocab_size", 0) or len(self._tok))
        # the context length: given (model.max_model_len), else the model's own; vLLM gets it as max_model_len so
        # its KV cache is sized for it and ModelWorker refuses longer items alone before they reach generate()
        self.max_model_len = max_model_len or context_length(cfg.to_dict())
        kwargs = dict(llm_kwargs)
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        kwargs["max_logprobs"] = max(int(kwargs.get("max_logprobs", 20)), topk)
        ext = WeightReloadExtension
        kwargs.setdefault("worker_extension_cls", f"{ext.__module__}.{ext.__qualname__}")
        try:
            self.llm = vllm.LLM(model=resolved, gpu_memory_utilization=gpu_memory_utilization, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load a model from {resolved}: {str(e).splitlines()[0]}") from e
        self._lock = threading.Lock()
        self._path = resolved
        self._version = version

    @property
    def version(self) -> int:
        return self._version

    @property
    def path(self) -> str:
        return self._path

    @property
    def tokenizer(self):
        return self._tok

    # ---- reload ------------------------------------------------------------------------------
    def reload(self, path: str, version: int) -> None:
        """Swap in the weights saved at ``path`` (a local safetensors checkpoint of the same
        architecture), in place, through ``collective_rpc`` into :class:`WeightReloadExtension`.

        A running ``generate`` holds the lock, so it finishes on the weights it started with; requests
        that arrive during the swap wait for it (the time to read the checkpoint from disk). This replica
        does not serve two versions at once — that would need a second engine and a second KV cache on
        the same GPU — so zero-downtime serving is the generator pool's job (caspo/mesh/actors.py): it
        reloads its replicas one at a time while the others keep serving. (``LLM.sleep``/``wake_up`` with ``enable_sleep_mode``
        is the alternative for colocated training; it is not needed here.)
        If loading fails part-way the replica holds mixed weights: the error is raised with the old
        version number kept, and the pool must take this replica out of service.
        """
        resolved = resolve_model_path(path)
        if not Path(resolved).is_dir() or not any(Path(resolved).glob("*.safetensors")):
            raise ModelLoadError(f"no model at {resolved}: reload needs a local directory of *.safetensors")
        with self._lock:
            try:
                self.llm.collective_rpc("caspo_load_safetensors", args=(resolved,))
            except Exception as e:  # the worker's error arrives wrapped; keep its first line
                why = str(e).splitlines()[0] if str(e) else repr(e)
                raise ModelLoadError(f"cannot load weights from {resolved}: {why}") from e
            self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
            self._path, self._version = resolved, version
        log.info("reloaded policy version %d from %s (vllm, in place)", version, resolved)

    def load_weights(self, weights, version: int, path: str, bucket_bytes: int = 1 << 28) -> None:
        """Switch to ``version`` from received tensors (caspo.models.transport): staged on the CPU until the
        whole version is here and its checksum holds, then handed to the engine's ``load_weights`` through
        ``collective_rpc`` bucket by bucket (the reload path without the file), then the prefix cache is
        reset. Not run here yet: vLLM needs a GPU (docs/benchmarks.md says what has run)."""
        staged = [(name, t.to("cpu", copy=True)) for name, t in weights]  # exhausting it checks the checksum
        with self._lock:
            try:
                bucket, size = [], 0
                for name, t in staged:
                    bucket.append((name, t))
                    size += t.numel() * t.element_size()
                    if size >= bucket_bytes:
                        self.llm.collective_rpc("caspo_load_tensors", args=(bucket,))
                        bucket, size = [], 0
                if bucket:
                    self.llm.collective_rpc("caspo_load_tensors", args=(bucket,))
            except Exception as e:  # noqa: BLE001 - the worker's error arrives wrapped; keep its first line
                why = str(e).splitlines()[0] if str(e) else repr(e)
                raise ModelLoadError(f"cannot load received weights of v{version}: {why}") from e
            self.llm.reset_prefix_cache()
            self._path, self._version = path, version
        log.info("switched to policy version %d over the transport (vllm, in place)", version)

    # ---- sampling ----------------------------------------------------------------------------
    def _position(self, lps: dict, token_id: int) -> tuple[float, float]:
        """(top-k entropy estimate, exact log-prob of ``token_id``) from one position's logprob dict."""
        if token_id not in lps:
            raise RuntimeError(f"vLLM returned no log-prob for token {token_id}")
        ent = topk_entropy_estimate([v.logprob for v in lps.values()], self.vocab_size)
        return ent, float(lps[token_id].logprob)

    def sample_steps(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float,
        seeds: Sequence[int | None] | None = None,
    ) -> list[list[ProposedStep]]:
        """n sampled steps per prompt.

        Every sample is its own request (``n=1``) with seed ``derive_seed(seed, j)`` — the per-sample seeds
        of the HF backend — so a seeded sample is the same whatever else is in the batch and whatever
        vLLM does with ``n > 1``. Requests stop on the delimiter string; one that stopped on a delimiter
        before any content (a leading empty line) is continued from its own token ids until a delimiter
        follows content, EOS, or ``max_step_tokens`` in all.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if temperature == 0 and n > 1:
            raise ValueError("temperature 0 is greedy: n must be 1")
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"prompts and seeds differ in length ({len(prompts)} vs {len(seeds)})")
        rows: list[_Row] = []
        for p, sd in zip(prompts, seeds):
            ids = self._tok.encode(p, add_special_tokens=self.add_special_tokens)
            for j in range(n):
                rows.append(_Row(ids, derive_seed(sd, j) if sd is not None and temperature > 0 else None))
        with self._lock:
            self._generate(rows, temperature)
        out: list[list[ProposedStep]] = []
        for i in range(len(prompts)):
            group = []
            for r in rows[i * n : (i + 1) * n]:
                group.append(
                    ProposedStep(
                        text=_step_text(r.text, self.delimiter),
                        token_entropies=tuple(r.ents),
                        token_logprobs=tuple(r.lps),
                        ended=r.ended,
                        entropy_estimate=True,
                    )
                )
            out.append(group)
        return out

    def _generate(self, rows: list[_Row], temperature: float) -> None:
        SamplingParams = self._vllm.SamplingParams
        pending = list(rows)
        rnd = 0
        while pending:
            requests = [{"prompt_token_ids": r.prompt_ids + r.tokens} for r in pending]
            params = [
                SamplingParams(
                    n=1,
                    temperature=temperature,
                    seed=None if r.seed is None else (r.seed if rnd == 0 else derive_seed(r.seed, "continue", rnd)),
                    stop=[self.delimiter],
                    include_stop_str_in_output=True,
                    logprobs=self.topk,
                    max_tokens=self.max_step_tokens - len(r.tokens),
                )
                for r in pending
            ]
            outs = self.llm.generate(requests, params, use_tqdm=False)
            still: list[_Row] = []
            for r, o in zip(pending, outs):
                c = o.outputs[0]
                token_ids = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) < len(token_ids):
                    raise RuntimeError("vLLM returned fewer log-prob positions than tokens")
                for t, pos in zip(token_ids, c.logprobs):
                    ent, lp = self._position(pos, t)
                    r.tokens.append(t)
                    r.ents.append(ent)
                    r.lps.append(lp)
                r.text += c.text
                on_delimiter = c.finish_reason == "stop" and c.stop_reason == self.delimiter
                if on_delimiter and _step_end(r.text, self.delimiter) is not None:
                    continue  # a complete step
                if on_delimiter and len(r.tokens) < self.max_step_tokens:
                    still.append(r)  # only an empty line so far: keep going
                    continue
                r.ended = True  # EOS, a stop token, or the token budget ran out
            pending = still
            rnd += 1

    # ---- a judge's answer -----------------------------------------------------------------------
    def answer_logprobs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[float]]:
        """Exact log p of each answer's first token after each prompt, without ``prompt_logprobs``: a one-token
        greedy request per (prompt, answer) with ``allowed_token_ids=[that token]`` and ``logprobs=0``. vLLM's V1
        sampler computes the returned log-probs from the raw logits before it applies ``allowed_token_ids``
        (``logprobs_mode`` raw_logprobs, its default) and always returns the sampled token's, so the forced token's
        value is its full-vocabulary log-prob. The answers go in one ``generate`` call each, in turn, so every
        answer after the first finds the prompt's KV blocks in the prefix cache (requests with
        ``prompt_logprobs`` skip that cache): one prefill per prompt."""
        if not prompts:
            return []
        ids = [{"prompt_token_ids": self._tok.encode(p, add_special_tokens=self.add_special_tokens)} for p in prompts]
        out: list[list[float]] = [[] for _ in prompts]
        for t in first_tokens(self._tok, answers):
            params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, allowed_token_ids=[t])
            with self._lock:
                outs = self.llm.generate(ids, params, use_tqdm=False)
            for row, o in zip(out, outs):
                lps = o.outputs[0].logprobs[0]
                if t not in lps:
                    raise RuntimeError(f"vLLM returned no log-prob for the forced token {t}")
                row.append(float(lps[t].logprob))
        return out

    # ---- teacher-forced scoring ---------------------------------------------------------------
    def score_steps(self, prompts: Sequence[str], steps: Sequence[str]) -> list[StepScore]:
        """Log-probs of ``steps[i].strip() + delimiter`` after ``prompts[i]`` from ``prompt_logprobs``
        (exact), with top-k **estimates** of the entropies — unlike the HF backend's exact ones; callers
        that need exact entropies score on the HF backend (the ConfidenceScorer)."""
        if len(prompts) != len(steps):
            raise ValueError(f"prompts and steps differ in length ({len(prompts)} vs {len(steps)})")
        if not prompts:
            return []
        seqs, spans = [], []
        for p, st in zip(prompts, steps):
            pi = self._tok.encode(p, add_special_tokens=self.add_special_tokens)
            si = self._tok.encode(st.strip() + self.delimiter, add_special_tokens=False)
            if not pi:
                raise ValueError("an empty prompt encodes to no tokens: the first step token has no context")
            seqs.append(pi + si)
            spans.append((len(pi), len(si)))
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.topk)
        with self._lock:
            outs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        scores = []
        for seq, (pl, sl), o in zip(seqs, spans, outs):
            plp = o.prompt_logprobs  # plp[t]: position t given tokens < t; plp[0] is None
            ents, lps = [], []
            for t in range(pl, pl + sl):
                ent, lp = self._position(plp[t], seq[t])
                ents.append(ent)
                lps.append(lp)
            scores.append(StepScore(tuple(ents), tuple(lps)))
        return scores
