"""transformers backend (CPU or CUDA): batched step sampling with a KV cache, teacher-forced scoring.

Sampling is a plain decoding loop rather than ``generate`` because three things must hold at once:
entropies come from the very logits the sampler used (before temperature), a row stops at the first
step delimiter that follows real content (any token whose text holds the delimiter), and a seeded row
samples the same tokens whatever else shares its batch (each seeded row draws from its own generator).
"""

from __future__ import annotations

import inspect
import logging
import threading
from pathlib import Path
from typing import Iterable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from caspo.config import SYSTEM_PROMPT
from caspo.core.contract import ProposedStep, derive_seed
from caspo.core.confidence import token_entropy, token_logprobs, topk_entropy_estimates
from caspo.core.steps import DEFAULT_DELIMITER
from caspo.models.base import ModelLoadError, StepScore, context_length
from caspo.models.tiny import resolve_tiny
from caspo.models.tiny_chat import resolve_tiny_chat

log = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    """``tiny`` → the built-in tiny reasoner, ``tiny-chat`` → the built-in chat model; an existing directory → itself; anything else is passed
    to ``from_pretrained`` as a hub id (which needs a reachable hub or a local cache)."""
    if name_or_path == "tiny":
        return str(resolve_tiny())
    if name_or_path == "tiny-chat":
        return str(resolve_tiny_chat())
    p = Path(name_or_path).expanduser()
    try:
        exists = p.exists()
    except OSError as e:  # e.g. a name longer than the filesystem allows
        raise ModelLoadError(f"no model at {name_or_path[:200]}: {e.strerror}") from None
    if exists:
        if not (p / "config.json").exists():
            raise ModelLoadError(f"no model at {p}: config.json is missing")
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"no model at {name_or_path}: the path does not exist")
    return name_or_path


def local_model_path(name_or_path: str, field: str = "model.policy") -> str:
    """``resolve_model_path`` for what must be a local directory (the policy the loop trains: DPO and
    publishing read ``config.json`` from disk): a hub id is refused at once, in one line naming ``field``,
    rather than after a whole data round when DPO first needs the directory."""
    try:
        path = resolve_model_path(name_or_path)
    except ModelLoadError as e:
        raise ModelLoadError(f"{field}: {e}") from None
    if not (Path(path) / "config.json").is_file():
        raise ModelLoadError(
            f"{field}: {name_or_path!r} is a hub id, not a local model directory; the loop trains the policy with DPO, "
            f"which needs one: download it first (huggingface-cli download {name_or_path} --local-dir DIR) and set {field} to DIR"
        )
    return path


def load_model(path: str, device: str | None = None, dtype: torch.dtype | None = None):
    """Load model and tokenizer with ``from_pretrained``; weights only from safetensors."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a model from {path}: {str(e).splitlines()[0]}") from e
    model.to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


class _Weights:
    """One loaded policy: what a request captures at its start so a reload cannot change it midway."""

    def __init__(self, model, tokenizer, delimiter: str, version: int, path: str):
        self.model = model
        self.tok = tokenizer
        self.version = version
        self.path = path
        self.device = next(model.parameters()).device
        # every vocabulary entry whose text holds the delimiter can end a step
        vocab_text = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.delim_token = torch.tensor([delimiter in t for t in vocab_text], device=self.device)
        # a delimiter of several characters ("\n\n") may also arrive split over tokens ("\n", "\n"): a
        # token holding its last character makes the row's text be looked at
        self.delim_tail = torch.tensor([delimiter[-1] in t for t in vocab_text], device=self.device)
        self.split_delimiter = len(delimiter) > 1
        self.content_token = torch.tensor([t.strip() != "" for t in vocab_text], device=self.device)
        self.stop_ids = {i for i in (tokenizer.eos_token_id,) if i is not None}
        # transformers 5 renamed forward's past_key_values to cache (the old name warns, then goes)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _empty_like(model):
    """A model of ``model``'s architecture, dtype and device with its memory allocated but not filled
    (what a publish fills; cheaper than copying the old weights first), non-persistent buffers
    (rotary frequencies) copied, tied weights tied."""
    p = next(model.parameters())
    with torch.device("meta"):
        empty = type(model)(model.config)
    empty = empty.to(p.dtype).to_empty(device=p.device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            empty.get_buffer(name).copy_(buf)
    empty.tie_weights()
    return empty.eval()


class HFBackend:
    name = "hf"

    def __init__(
        self,
        path: str = "tiny",
        version: int = 0,
        delimiter: str = DEFAULT_DELIMITER,
        max_step_tokens: int = 32,
        max_batch_rows: int = 256,
        device: str | None = None,
        prompt_format: str = "plain",
        system_prompt: str = SYSTEM_PROMPT,
        max_model_len: int | None = None,
    ):
        self.delimiter = delimiter
        self.prompt_format = prompt_format  # chat: prompts come from the chat template, special tokens included
        self.system_prompt = system_prompt
        self.add_special_tokens = prompt_format == "plain"
        self.max_step_tokens = max_step_tokens
        self.max_batch_rows = max_batch_rows
        self.device_name = device
        self._lock = threading.Lock()
        self._w = self._load(path, version)
        # the context length: given (model.max_model_len), else the model's own (max_position_embeddings, ...)
        self.max_model_len = max_model_len or context_length(self._w.model.config.to_dict())
        # False only to measure what the entropies cost (bench overhead suite): steps then carry zeros
        self.compute_entropy = True
        # True: each prompt is prefilled once and its KV cache shared by its n samples; False (to measure
        # and test the sharing): n separate prefills. Same seeds, same tokens and entropies either way.
        self.share_prefill = True
        self.forward_passes = 0  # model forward calls so far (prefills and decode steps)
        self.prefill_rows = 0  # prompt rows prefilled so far
        self.disk_loads = 1  # checkpoints read from disk so far (a publish over the transport reads none)

    def _load(self, path: str, version: int) -> _Weights:
        resolved = resolve_model_path(path)
        model, tok = load_model(resolved, self.device_name)
        return _Weights(model, tok, self.delimiter, version, resolved)

    @property
    def version(self) -> int:
        return self._w.version

    @property
    def path(self) -> str:
        return self._w.path

    @property
    def tokenizer(self):
        return self._w.tok

    @property
    def model(self):
        return self._w.model

    def reload(self, path: str, version: int) -> None:
        new = self._load(path, version)  # load outside the lock: serving goes on meanwhile
        self.disk_loads += 1
        with self._lock:
            self._w = new
        log.info("reloaded policy version %d from %s", version, new.path)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int, path: str) -> None:
        """Switch to ``version`` from tensors (name, tensor) as they arrive (caspo.models.transport): they
        fill a copy of the current model, converted to its dtype and device, while requests keep running on
        the current one; the switch happens once ``weights`` is exhausted without error, so a broadcast that
        fails or arrives corrupted leaves the replica serving what it had. ``path`` is the checkpoint these
        weights are (what ``path`` reports)."""
        cur = self._w
        model = _empty_like(cur.model)
        params = model.state_dict(keep_vars=True)  # every name, tied ones included: the publisher's names
        filled: set[int] = set()
        with torch.no_grad():
            for name, t in weights:
                if name not in params:
                    raise ModelLoadError(f"received weight {name!r} is not a parameter of the served model")
                p = params[name]
                if tuple(p.shape) != tuple(t.shape):
                    raise ModelLoadError(f"received weight {name!r} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
                p.copy_(t)  # the receiving side's dtype and device
                filled.add(p.data_ptr())
            old = cur.model.state_dict()
            for name, p in params.items():  # what was not sent (and is not tied to what was) stays as it is
                if p.data_ptr() not in filled:
                    p.copy_(old[name])
        new = _Weights(model, cur.tok, self.delimiter, version, path)
        with self._lock:
            self._w = new
        log.info("switched to policy version %d over the transport", version)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._w.model.state_dict()

    # ---- sampling ----------------------------------------------------------------------------
    def _encode_left(self, w: _Weights, texts: Sequence[str]):
        # the tokenizer decides about <bos> (add_special_tokens), as it did in training; a chat template writes
    # its own special tokens
        enc = [w.tok.encode(t, add_special_tokens=self.add_special_tokens) for t in texts]
        width = max(len(e) for e in enc)
        pad = w.tok.pad_token_id
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        return ids.to(w.device), mask.to(w.device)

    def sample_steps(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float,
        seeds: Sequence[int | None] | None = None,
    ) -> list[list[ProposedStep]]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if temperature == 0 and n > 1:
            raise ValueError("temperature 0 is greedy: n must be 1")
        w = self._w  # captured once: a concurrent reload does not touch this request
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        out: list[list[ProposedStep]] = []
        per_chunk = max(1, self.max_batch_rows // n)
        for s in range(0, len(prompts), per_chunk):
            out += self._sample_chunk(w, prompts[s : s + per_chunk], n, temperature, seeds[s : s + per_chunk])
        return out

    @torch.inference_mode()
    def _sample_chunk(self, w: _Weights, prompts, n, temperature, seeds) -> list[list[ProposedStep]]:
        ids, mask = self._encode_left(w, prompts)
        share = self.share_prefill or n == 1
        if not share:  # n separate prefills of each prompt (rows i*n .. i*n+n-1, as after the fan-out)
            ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        cache = DynamicCache(config=w.model.config)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = w.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{w.cache_arg: cache}).logits[:, -1]
        self.forward_passes += 1
        self.prefill_rows += ids.shape[0]
        if share and n > 1:  # prefill each prompt once, then fan the cache out to its n samples
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, 0)
            mask = mask.repeat_interleave(n, 0)
            pos = pos.repeat_interleave(n, 0)
        rows = logits.shape[0]
        gens = None
        if temperature > 0 and any(sd is not None for sd in seeds):
            gens = []
            for i in range(len(prompts)):
                for j in range(n):
                    g = None
                    if seeds[i] is not None:
                        g = torch.Generator(device=w.device)
                        g.manual_seed(derive_seed(seeds[i], j))
                    gens.append(g)
        next_pos = pos[:, -1] + 1
        tokens = [[] for _ in range(rows)]
        ents = [[] for _ in range(rows)]
        lps = [[] for _ in range(rows)]
        has_content = torch.zeros(rows, dtype=torch.bool, device=w.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=w.device)
        ended = [False] * rows
        for _ in range(self.max_step_tokens):
            h = token_entropy(logits) if self.compute_entropy else torch.zeros(rows, device=w.device)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                u = torch.rand(logits.shape, device=w.device)
                if gens is not None:
                    for r, g in enumerate(gens):
                        if g is not None:
                            u[r] = torch.rand(logits.shape[-1], generator=g, device=w.device)
                gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
                nxt = (logits.float() / temperature + gumbel).argmax(-1)
            lp = token_logprobs(logits, nxt)
            h_l, lp_l, nxt_l, fin_l = h.tolist(), lp.tolist(), nxt.tolist(), finished.tolist()
            for r in range(rows):
                if not fin_l[r]:
                    tokens[r].append(nxt_l[r])
                    ents[r].append(h_l[r])
                    lps[r].append(lp_l[r])
            is_stop = torch.tensor([t in w.stop_ids for t in nxt_l], device=w.device)
            stops_here = is_stop | (w.delim_token[nxt] & has_content)
            for r in torch.nonzero(is_stop & ~finished).flatten().tolist():
                ended[r] = True
            if w.split_delimiter:  # the delimiter spread over tokens, after content
                for r in torch.nonzero(w.delim_tail[nxt] & has_content & ~finished & ~stops_here).flatten().tolist():
                    if self.delimiter in w.tok.decode(tokens[r], skip_special_tokens=True).lstrip():
                        stops_here[r] = True
            has_content |= w.content_token[nxt]
            finished |= stops_here
            if bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=w.device)], dim=1)
            logits = w.model(
                input_ids=nxt.unsqueeze(1),
                attention_mask=mask,
                position_ids=next_pos.unsqueeze(1),
                use_cache=True,
                **{w.cache_arg: cache},
            ).logits[:, -1]
            self.forward_passes += 1
            next_pos = next_pos + 1
        fin_l = finished.tolist()
        out: list[list[ProposedStep]] = []
        for i in range(len(prompts)):
            group = []
            for j in range(n):
                r = i * n + j
                text = w.tok.decode(tokens[r], skip_special_tokens=True)
                cut = text.lstrip()
                k = cut.find(self.delimiter)
                step = (cut[:k] if k >= 0 else cut).strip()
                group.append(
                    ProposedStep(
                        text=step,
                        token_entropies=tuple(ents[r]),
                        token_logprobs=tuple(lps[r]),
                        ended=ended[r] or not fin_l[r],
                    )
                )
            out.append(group)
        return out

    # ---- teacher-forced scoring ---------------------------------------------------------------
    @torch.inference_mode()
    def score_steps(self, prompts: Sequence[str], steps: Sequence[str]) -> list[StepScore]:
        if len(prompts) != len(steps):
            raise ValueError(f"prompts and steps differ in length ({len(prompts)} vs {len(steps)})")
        w = self._w
        out: list[StepScore] = []
        for s in range(0, len(prompts), self.max_batch_rows):
            out += self._score_chunk(w, prompts[s : s + self.max_batch_rows], steps[s : s + self.max_batch_rows])
        return out

    def step_sequences(self, prompts: Sequence[str], steps: Sequence[str], tok=None) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Token ids of each prompt followed by its step (``step.strip()`` plus the delimiter) and the step's span
        ``(start, n)``: what :func:`teacher_forced` scores."""
        tok = tok or self._w.tok
        seqs, spans = [], []
        for p, st in zip(prompts, steps):
            pi = tok.encode(p, add_special_tokens=self.add_special_tokens)
            si = tok.encode(st.strip() + self.delimiter, add_special_tokens=False)
            seqs.append(pi + si)
            spans.append((len(pi), len(si)))
        return seqs, spans

    def _score_chunk(self, w: _Weights, prompts, steps) -> list[StepScore]:
        seqs, spans = self.step_sequences(prompts, steps, w.tok)
        return [StepScore(tuple(h), tuple(lp)) for h, lp in teacher_forced(w.model, seqs, spans, w.tok.pad_token_id)]

    @torch.inference_mode()
    def answer_logprobs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[float]]:
        w = self._w
        wanted = torch.tensor(first_tokens(w.tok, answers), device=w.device)
        out: list[list[float]] = []
        for s in range(0, len(prompts), self.max_batch_rows):
            ids, mask = self._encode_left(w, prompts[s : s + self.max_batch_rows])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = w.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            self.forward_passes += 1
            rows = logits.unsqueeze(1).expand(-1, len(answers), -1)
            out += token_logprobs(rows, wanted.expand(logits.shape[0], -1)).tolist()
        return out


def first_tokens(tok, answers: Sequence[str]) -> list[int]:
    """The first token id of each answer as it is encoded after a prompt (no special tokens), as ``score_steps``
    encodes a step."""
    ids = []
    for a in answers:
        enc = tok.encode(a, add_special_tokens=False)
        if not enc:
            raise ValueError(f"answer {a!r} encodes to no tokens")
        ids.append(enc[0])
    return ids


@torch.inference_mode()
def teacher_forced(model, seqs: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], pad_id: int, entropies: bool = True, topk: int | None = None) -> list[tuple]:
    """The one teacher-forced pass of the project: for each token sequence ``seqs[i]`` and its span ``spans[i] =
    (start, n)``, the per-token entropies (paper eq. 2's H, exact over the vocabulary; empty when ``entropies`` is
    False) and log-probs of tokens ``start .. start+n-1`` given the tokens before them, from one right-padded
    forward pass (positions plain 0..L-1). The scorer scores steps with it and DPO computes its reference log-probs
    with it; the formulas are :func:`caspo.core.confidence.token_entropy` and ``token_logprobs``. With ``topk``
    each tuple also holds what a top-k engine would report as the entropies (``topk_entropy_estimates``: the
    estimate's bias is measured against the exact values)."""
    if any(start < 1 for start, _ in spans):
        raise ValueError("a scored span must start after at least one token: its first token needs a context")
    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, sq in enumerate(seqs):
        ids[i, : len(sq)] = torch.tensor(list(sq), dtype=torch.long)
        mask[i, : len(sq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    # logits at position t predict token t+1
    pred, target = logits[:, :-1], ids[:, 1:]
    tmask = torch.zeros_like(target)
    for i, (start, n) in enumerate(spans):
        tmask[i, start - 1 : start - 1 + n] = 1
    h = token_entropy(pred, tmask).tolist() if entropies else None
    lp = token_logprobs(pred, target, tmask).tolist()
    out = []
    for i, (start, n) in enumerate(spans):
        row = (h[i][start - 1 : start - 1 + n] if h is not None else [], lp[i][start - 1 : start - 1 + n])
        if topk is not None:
            row += (topk_entropy_estimates(pred[i, start - 1 : start - 1 + n], target[i, start - 1 : start - 1 + n], topk),)
        out.append(row)
    return out
