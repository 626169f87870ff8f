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
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, processors
from tokenizers.models import BPE
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from caspo.core.stats import wilson_interval
from caspo.core.steps import final_answer, join_steps, split_steps
from caspo.plots import pyplot
from caspo.plots import save as save_figure
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
    log.warning("no tiny model found; training one into %s (recipe %s: 36 minutes measured on 2 shared cores, docs/reasoner.md)", user, DEFAULT_RECIPE)
    train_tiny(TinyTrainConfig(**TINY_RECIPES[DEFAULT_RECIPE]), user)
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
    # cosine: decay over the whole run (so a shorter run is not the start of a longer one); wsd: warm up,
    # hold the peak, then decay linearly over the last ``decay_frac`` of the steps
    schedule: str = "cosine"
    decay_frac: float = 0.2
    weight_decay: float = 0.01
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    checkpoint_every: int = 100
    threads: int = 0  # 0: torch's default
    # weight of the result digits of each step in the loss. Copying the expression is learned at once;
    # arithmetic is what a small model learns last, and at 1x it had not yet (9% held-out accuracy after
    # 1,300 steps); at 3x, 1,600 steps reach 66% (docs/models.md, "The previous model (recipe v1)")
    result_weight: float = 3.0
    # True: each packed document starts at position 0 and attends to itself only, as it is served (one
    # question alone after <bos>); False: documents run on across the window and see the ones before
    doc_boundaries: bool = False
    # every this many steps (0: never) greedy accuracy on ``eval_n`` problems of the validation split
    # goes to curve.jsonl, and the best checkpoint by it is the one saved
    eval_every: int = 0
    eval_n: int = 200
    # diagnostic: also measure accuracy with this many solved training problems before each question,
    # the context that packing without boundaries trains on
    eval_context: int = 0


SCHEDULES = ("cosine", "wsd")

# named recipes for ``caspo train-base --recipe``: v1, the dataclass defaults, made the first shipped
# weights; v2, the shipped weights now, fixes what made v1's budget curve jump (docs/reasoner.md):
# documents packed with boundaries, so a question is trained as it is served, a warmup-stable-decay
# schedule, the checkpoint chosen on the validation split, and two more layers
TINY_RECIPES = {
    "v1": {},
    "v2": {"steps": 2500, "lr": 2e-3, "warmup": 100, "schedule": "wsd", "decay_frac": 0.2, "num_layers": 6,
           "doc_boundaries": True, "eval_every": 250, "eval_n": 200},
}
DEFAULT_RECIPE = "v2"  # the recipe of caspo/models/tiny_weights


def lr_at(cfg: TinyTrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "wsd":
        decay_start = cfg.steps - int(cfg.decay_frac * cfg.steps)
        if step < decay_start:
            return cfg.lr
        return cfg.lr * (cfg.steps - step) / max(1, cfg.steps - decay_start)
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def check_config(cfg: TinyTrainConfig) -> None:
    """ValueError naming the field and its limit."""
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if not 0 < cfg.decay_frac <= 1:
        raise ValueError(f"decay_frac must be in (0, 1], got {cfg.decay_frac}")
    if cfg.eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {cfg.eval_every}")
    if cfg.eval_every and cfg.eval_n < 1:
        raise ValueError(f"eval_n must be >= 1, got {cfg.eval_n}")
    if cfg.eval_context < 0:
        raise ValueError(f"eval_context must be >= 0, got {cfg.eval_context}")


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


def _documents(cfg: TinyTrainConfig, tokenizer, seed: int):
    """Endless (ids, labels, weights) of training documents: <bos> prompt solution <eos>, the loss on
    solution and <eos> only, each result digit weighted ``cfg.result_weight``. The tokenizer is
    character-level, so characters are tokens."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for prompt, solution in ArithTask().iter_train_text(seed):
        p = tokenizer.encode(prompt, add_special_tokens=False)
        s = tokenizer.encode(solution, add_special_tokens=False)
        yield ([bos] + p + s + [eos], [-100] * (1 + len(p)) + s + [eos],
               [0.0] * (1 + len(p)) + result_weights(solution, cfg.result_weight) + [1.0])


def _packed_batches(cfg: TinyTrainConfig, tokenizer, seed: int):
    """Endless (input_ids, labels, loss weights, position_ids) batches of documents packed into seq_len
    windows.

    Without ``cfg.doc_boundaries`` documents run on from row to row and position_ids are None (a row
    is one sequence that attends across documents). With it, a row holds whole documents, the rest
    padded (no loss), and position_ids restart at 0 on every document, which transformers reads as
    packed sequences: each attends to itself only.
    """
    docs = _documents(cfg, tokenizer, seed)
    need = cfg.batch_size * cfg.seq_len
    if not cfg.doc_boundaries:
        ids_buf: list[int] = []
        lab_buf: list[int] = []
        wt_buf: list[float] = []
        while True:
            while len(ids_buf) < need:
                i, lab, w = next(docs)
                ids_buf += i
                lab_buf += lab
                wt_buf += w
            ids = torch.tensor(ids_buf[:need]).view(cfg.batch_size, cfg.seq_len)
            labels = torch.tensor(lab_buf[:need]).view(cfg.batch_size, cfg.seq_len)
            weights = torch.tensor(wt_buf[:need]).view(cfg.batch_size, cfg.seq_len)
            del ids_buf[:need], lab_buf[:need], wt_buf[:need]
            yield ids, labels, weights, None
    pad = tokenizer.pad_token_id
    pending = next(docs)
    while True:
        rows = []
        for _ in range(cfg.batch_size):
            ids, labels, weights, pos = [], [], [], []
            while len(ids) + len(pending[0]) <= cfg.seq_len:
                i, lab, w = pending
                ids += i
                labels += lab
                weights += w
                pos += list(range(len(i)))
                pending = next(docs)
            if not ids:
                raise ValueError(f"seq_len {cfg.seq_len} is shorter than a document ({len(pending[0])} tokens)")
            rest = cfg.seq_len - len(ids)
            rows.append((ids + [pad] * rest, labels + [-100] * rest, weights + [0.0] * rest, pos + list(range(rest))))
        yield tuple(torch.tensor([r[k] for r in rows]) for k in range(4))


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, each target weighted, normalised by the total weight."""
    logits, labels, weights = logits[:, :-1], labels[:, 1:], weights[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    return (ce * weights.reshape(-1)).sum() / weights.sum()


@torch.inference_mode()
def validation_metrics(model, tokenizer, problems: list, task: ArithTask, context: int = 0, batch: int = 100,
                       max_new_tokens: int = 160, seed: int = 0) -> dict:
    """Greedy accuracy (with its 95% Wilson interval) and the mean solution-token loss of ``model`` on
    ``problems``, each prompted alone after <bos> as it is served; with ``context`` > 0, each prompt
    comes after that many solved training problems instead (``accuracy_in_context``), the context
    that packing without document boundaries trains on."""
    was_training = model.training
    model.eval()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    prefix: list[int] = []
    if context:
        stream = task.iter_train_text(10_000_019 + seed)
        for _ in range(context):
            q, sol = next(stream)
            prefix += [bos] + tokenizer.encode(q + sol, add_special_tokens=False) + [eos]
    correct = 0
    loss_sum, loss_tokens = 0.0, 0
    for s in range(0, len(problems), batch):
        chunk = problems[s : s + batch]
        prompts = [prefix + [bos] + tokenizer.encode(task.prompt(p.question), add_special_tokens=False) for p in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(prompts):
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)
        for p, row in zip(chunk, out[:, width:]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            steps = split_steps(text)
            finals = [final_answer(st) for st in steps if final_answer(st) is not None]
            correct += bool(finals) and task.answer_correct(p, finals[0])
        if not context:  # teacher-forced loss of the reference solutions
            docs = [[bos] + tokenizer.encode(task.prompt(p.question), add_special_tokens=False) for p in chunk]
            sols = [tokenizer.encode(join_steps(p.gold_steps), add_special_tokens=False) + [eos] for p in chunk]
            width = max(len(d) + len(t) for d, t in zip(docs, sols))
            ids = torch.full((len(docs), width), pad, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for i, (d, t) in enumerate(zip(docs, sols)):
                ids[i, : len(d) + len(t)] = torch.tensor(d + t)
                labels[i, len(d) : len(d) + len(t)] = torch.tensor(t)
                mask[i, : len(d) + len(t)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                   ignore_index=-100, reduction="sum")
            loss_sum += ce.item()
            loss_tokens += int((labels[:, 1:] != -100).sum())
    n = len(problems)
    key = "accuracy_in_context" if context else "accuracy"
    out = {key: correct / n, f"{key}_ci": list(wilson_interval(correct, n)), "n": n}
    if not context:
        out["loss"] = loss_sum / loss_tokens
    if was_training:
        model.train()
    return out


def plot_curve(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Validation accuracy (95% Wilson intervals) and the learning rate against training steps."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key, label in (("accuracy", "greedy, question alone (as served)"), ("accuracy_in_context", "greedy, after solved problems")):
        pts = [r for r in rows if key in r]
        if pts:
            acc = [r[key] for r in pts]
            # an interval's end can sit a rounding error inside its point (0 and a lower end of 1e-18)
            lo = [max(0.0, r[key] - r[f"{key}_ci"][0]) for r in pts]
            hi = [max(0.0, r[f"{key}_ci"][1] - r[key]) for r in pts]
            ax.errorbar([r["step"] for r in pts], acc, yerr=[lo, hi], marker="o", ms=3, capsize=2, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation accuracy (n={rows[0]['n'] if rows else 0})")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in rows], color="grey", lw=1, ls="--", label="learning rate")
    lr.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    ax.legend(lines, [l.get_label() for l in lines], loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _save_model(model, tokenizer, path: Path) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def train_tiny(cfg: TinyTrainConfig, out_dir: str | Path, progress: bool = True, stop_at: int | None = None) -> Path | None:
    """Train the tiny reasoner from scratch into ``out_dir``, resuming from ``out_dir/_resume`` when a
    run was interrupted. ``stop_at`` ends this call after that many steps (a checkpoint step), leaving
    the run resumable; it returns None then, else the saved model's directory.

    With ``cfg.eval_every``, the validation curve goes to ``out_dir/curve.jsonl`` and ``curve.png`` and
    the checkpoint saved is the one with the best validation accuracy (the later one on a tie)."""
    check_config(cfg)
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
    task = ArithTask()
    val = task.problems(cfg.eval_n, seed=cfg.seed, split="val") if cfg.eval_every else []
    curve_file, best_dir = out / "curve.jsonl", resume_dir / "best"
    best: dict | None = None
    # what a checkpoint must match to be resumed: the recipe (the thread count only changes float sums)
    config_key = json.dumps({k: v for k, v in asdict(cfg).items() if k != "threads"}, sort_keys=True)

    start = 0
    state_file = resume_dir / "state.pt"
    if state_file.exists():
        # our own training state, written below; weights_only=True never unpickles arbitrary objects
        state = torch.load(state_file, weights_only=True)
        if state.get("config") == config_key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["step"])
            best = json.loads(state.get("best") or "null")
            log.info("resuming tiny training at step %d", start)
        else:
            log.warning("ignoring %s: it was written with another configuration", state_file)
    curve = [json.loads(line) for line in curve_file.read_text().splitlines()] if start and curve_file.exists() else []
    curve = [r for r in curve if r["step"] <= start]  # evaluations after the last checkpoint are redone
    if cfg.eval_every:
        curve_file.write_text("".join(json.dumps(r) + "\n" for r in curve))

    # the data stream is reseeded per step so a resumed run sees the same batches as an unbroken one
    model.train()
    t0 = time.time()
    tokens = 0
    eval_seconds = 0.0
    bar = tqdm(range(start, cfg.steps), desc="train-base", disable=not progress, initial=start, total=cfg.steps)
    batches = None
    loss_ema = None
    for step in bar:
        if batches is None or step % cfg.checkpoint_every == 0:
            batches = _packed_batches(cfg, tokenizer, seed=cfg.seed * 1_000_003 + step)
        ids, labels, weights, position_ids = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        if position_ids is None:
            logits = model(input_ids=ids).logits
        else:
            logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        loss = weighted_loss(logits, labels, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids.numel()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        post = {"loss": f"{loss_ema:.4f}", "tok_s": f"{tokens / max(1e-9, time.time() - t0 - eval_seconds):.0f}"}
        if best:
            post["val_best"] = f"{best['accuracy']:.3f}@{best['step']}"
        bar.set_postfix(post)
        done = step + 1
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            te = time.time()
            row = {"step": done, "lr": lr_at(cfg, step), "train_loss_ema": loss_ema, **validation_metrics(model, tokenizer, val, task, seed=cfg.seed)}
            if cfg.eval_context:
                row.update(validation_metrics(model, tokenizer, val, task, context=cfg.eval_context, seed=cfg.seed))
            row["seconds"] = round(time.time() - te, 1)
            eval_seconds += time.time() - te
            curve.append(row)
            with curve_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if best is None or row["accuracy"] >= best["accuracy"]:
                best = {"step": done, "accuracy": row["accuracy"], "accuracy_ci": row["accuracy_ci"]}
                _save_model(model, tokenizer, best_dir)
            log.info("step %d: validation accuracy %.3f %s (best %.3f at %d)", done, row["accuracy"], row["accuracy_ci"], best["accuracy"], best["step"])
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            resume_dir.mkdir(exist_ok=True)
            tmp = resume_dir / "state.pt.tmp"
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done, "config": config_key,
                 "best": json.dumps(best)},
                tmp,
            )
            tmp.replace(state_file)
            if stop_at is not None and done >= stop_at:
                bar.close()
                return None

    model.eval()
    if best is not None:  # the checkpoint chosen on the validation split
        model.load_state_dict(LlamaForCausalLM.from_pretrained(best_dir).state_dict())
    _save_model(model, tokenizer, out)
    meta = {
        "config": asdict(cfg),
        "final_loss_ema": loss_ema,
        "train_seconds": round(time.time() - t0 - eval_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "tokens": tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if best is not None:
        meta["selected"] = {**best, "split": "val", "n": cfg.eval_n}
        plot_curve(curve, out / "curve.png", f"tiny reasoner: validation curve (hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.schedule})")
    (out / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if resume_dir.exists():
        shutil.rmtree(resume_dir)
    return out
