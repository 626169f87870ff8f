"""The built-in tiny reasoner: a small Llama trained from scratch on synthetic step arithmetic.

It is a plain transformers model (``LlamaForCausalLM``) with a character-level ``tokenizers``
tokenizer saved as ``tokenizer.json``, so ``AutoModelForCausalLM`` / ``AutoTokenizer`` (and vLLM) load
it with no custom code — the same loading path that real models take.

``caspo train-base`` runs :func:`train_tiny`. A copy trained with the defaults ships inside the package
(``caspo/models/tiny_weights``, 3.5 MB) so tests, demos and CI do not spend ~10 minutes training it;
``tiny`` resolves to ``$CASPO_HOME/tiny`` when a user has trained one there, else to the shipped copy.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, processors
from tokenizers.models import BPE
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from caspo.tasks.arith import ArithTask

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # newline + printable ASCII
SHIPPED_DIR = Path(__file__).parent / "tiny_weights"


def caspo_home() -> Path:
    return Path(os.environ.get("CASPO_HOME", Path.home() / ".cache" / "caspo"))


def resolve_tiny() -> Path:
    """Where the model named ``tiny`` lives: a user-trained copy in $CASPO_HOME, else the shipped one,
    else train one into $CASPO_HOME now (first use without the shipped copy)."""
    user = caspo_home() / "tiny"
    if (user / "config.json").exists():
        return user
    if (SHIPPED_DIR / "config.json").exists():
        return SHIPPED_DIR
    log.warning("no tiny model found; training one into %s (about 10 minutes on 2 cores)", user)
    train_tiny(TinyTrainConfig(), user)
    return user


def build_tokenizer():
    """Character-level tokenizer: a BPE with an empty merge list is exactly one token per character."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    # the tokenizer owns <bos>: encode(..., add_special_tokens=True) prepends it, as Llama tokenizers do
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )


@dataclass
class TinyTrainConfig:
    seed: int = 0
    steps: int = 1600
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    checkpoint_every: int = 100
    threads: int = 0  # 0: torch's default
    # weight of the result digits of each step in the loss. Copying the expression is learned at once;
    # arithmetic is what a small model learns last, and at 1x it had not yet (9% held-out accuracy after
    # 1,300 steps); at 3x, 1,600 steps reach 66% (README, "The built-in tiny reasoner")
    result_weight: float = 3.0


def build_model(cfg: TinyTrainConfig, tokenizer):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def result_weights(solution: str, weight: float) -> list[float]:
    """A loss weight per character of a solution: ``weight`` on the digits of each step's result (after
    ``=``, up to ``;`` or the end of the line), 1 elsewhere."""
    out, inside = [], False
    for ch in solution:
        if ch == "=":
            inside = True
        elif ch in ";\n":
            inside = False
        out.append(weight if inside and ch.isdigit() else 1.0)
    return out


def _packed_batches(cfg: TinyTrainConfig, tokenizer, seed: int):
    """Endless (input_ids, labels, loss weights) batches of documents packed into seq_len windows.

    A document is <bos> prompt solution <eos>; the loss covers solution and <eos> only, each result digit
    weighted ``cfg.result_weight``. The tokenizer is character-level, so characters are tokens.
    """
    stream = ArithTask().iter_train_text(seed)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids_buf: list[int] = []
    lab_buf: list[int] = []
    wt_buf: list[float] = []
    need = cfg.batch_size * cfg.seq_len
    while True:
        while len(ids_buf) < need:
            prompt, solution = next(stream)
            p = tokenizer.encode(prompt, add_special_tokens=False)
            s = tokenizer.encode(solution, add_special_tokens=False)
            ids_buf += [bos] + p + s + [eos]
            lab_buf += [-100] * (1 + len(p)) + s + [eos]
            wt_buf += [0.0] * (1 + len(p)) + result_weights(solution, cfg.result_weight) + [1.0]
        ids = torch.tensor(ids_buf[:need]).view(cfg.batch_size, cfg.seq_len)
        labels = torch.tensor(lab_buf[:need]).view(cfg.batch_size, cfg.seq_len)
        weights = torch.tensor(wt_buf[:need]).view(cfg.batch_size, cfg.seq_len)
        del ids_buf[:need], lab_buf[:need], wt_buf[:need]
        yield ids, labels, weights


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, each target weighted, normalised by the total weight."""
    logits, labels, weights = logits[:, :-1], labels[:, 1:], weights[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    return (ce * weights.reshape(-1)).sum() / weights.sum()


def train_tiny(cfg: TinyTrainConfig, out_dir: str | Path, progress: bool = True, stop_at: int | None = None) -> Path | None:
    """Train the tiny reasoner from scratch into ``out_dir``, resuming from ``out_dir/_resume`` when a
    run was interrupted. ``stop_at`` ends this call after that many steps (a checkpoint step), leaving
    the run resumable; it returns None then, else the saved model's directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_dir = out / "_resume"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    start = 0
    state_file = resume_dir / "state.pt"
    if state_file.exists():
        # our own training state, written below; weights_only=True never unpickles arbitrary objects
        state = torch.load(state_file, weights_only=True)
        if state.get("config") == json.dumps(asdict(cfg), sort_keys=True):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["step"])
            log.info("resuming tiny training at step %d", start)
        else:
            log.warning("ignoring %s: it was written with another configuration", state_file)

    # the data stream is reseeded per step so a resumed run sees the same batches as an unbroken one
    model.train()
    t0 = time.time()
    tokens = 0
    bar = tqdm(range(start, cfg.steps), desc="train-base", disable=not progress, initial=start, total=cfg.steps)
    batches = None
    loss_ema = None
    for step in bar:
        if batches is None or step % cfg.checkpoint_every == 0:
            batches = _packed_batches(cfg, tokenizer, seed=cfg.seed * 1_000_003 + step)
        ids, labels, weights = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = weighted_loss(model(input_ids=ids).logits, labels, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids.numel()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.4f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            resume_dir.mkdir(exist_ok=True)
            tmp = resume_dir / "state.pt.tmp"
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step + 1,
                    "config": json.dumps(asdict(cfg), sort_keys=True),
                },
                tmp,
            )
            tmp.replace(state_file)
            if stop_at is not None and step + 1 >= stop_at:
                bar.close()
                return None

    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {
        "config": asdict(cfg),
        "final_loss_ema": loss_ema,
        "train_seconds": round(time.time() - t0, 1),
        "tokens": tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if state_file.exists():
        state_file.unlink()
        resume_dir.rmdir()
    return out
