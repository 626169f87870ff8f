"""The built-in ``tiny-chat`` model: the real-model path (chat template, blank-line steps, ``\\boxed{}``
answers, a judge) made small enough to run on a CPU with no download.

It is a ``Qwen2ForCausalLM`` of a few hundred thousand parameters with a byte-level BPE tokenizer
trained (``tokenizers``) on the GSM8K train split, a Qwen-style chat template in its
``tokenizer_config.json`` (``<|im_start|>role ... <|im_end|>``; ``<|im_end|>`` is the end-of-turn
token), trained for about a minute on GSM8K solutions written as a chat model writes them: the Qwen-Math
system prompt, the question as the user turn, and as the assistant turn the solution's steps separated
by blank lines (calculator annotations dropped), ending with ``The answer is $\\boxed{x}$.``. Its
answers are mostly wrong; that every stage runs the real path with it is what it is for.

``caspo train-chat --data PATH`` runs :func:`train_tiny_chat` on the GSM8K train split the user names (a
JSONL file or a ``save_to_disk`` directory; there is no default). A copy trained with the defaults on the
full train split (7,473 problems; its sha256 is in ``train_meta.json``) ships in
``caspo/models/tiny_chat_weights``; ``tiny-chat`` resolves to ``$CASPO_HOME/tiny-chat`` when one was
trained there, else to the shipped copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from caspo.config import SYSTEM_PROMPT
from caspo.models.tiny import caspo_home
from caspo.tasks.gsm8k import load_gsm8k

SHIPPED_CHAT_DIR = Path(__file__).parent / "tiny_chat_weights"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_ANNOTATION = re.compile(r"<<[^>]*>>")


def resolve_tiny_chat() -> Path:
    """Where ``tiny-chat`` lives: a copy trained into $CASPO_HOME, else the shipped one."""
    user = caspo_home() / "tiny-chat"
    if (user / "config.json").exists():
        return user
    return SHIPPED_CHAT_DIR


@dataclass
class TinyChatTrainConfig:
    seed: int = 0
    vocab_size: int = 1024
    steps: int = 150
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 20
    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    threads: int = 0  # 0: torch's default


def chat_solution(gold_steps) -> str:
    """A GSM8K gold solution as a chat model writes it: blank-line steps, then the boxed answer."""
    steps = [_ANNOTATION.sub("", s).strip() for s in gold_steps if not s.lstrip().startswith("####")]
    answer = gold_steps[-1].split("####", 1)[1].strip().replace(",", "")
    return "\n\n".join([s for s in steps if s] + [f"The answer is $\\boxed{{{answer}}}$."])


def build_chat_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )


def _examples(tokenizer, data, seq_len: int):
    """(ids, labels) per problem: the chat prompt (no loss) and the assistant's solution + <|im_end|>."""
    out = []
    for p in data:
        prompt = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p.question}], tokenize=False, add_generation_prompt=True
        )
        pi = tokenizer.encode(prompt, add_special_tokens=False)
        si = tokenizer.encode(chat_solution(p.gold_steps), add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = (pi + si)[:seq_len]
        labels = ([-100] * len(pi) + si)[:seq_len]
        out.append((ids, labels))
    return out


def describe_data(path: str | Path, problems: int) -> dict:
    """What a model was trained on, without the path of the machine it was trained on: the file's (or the
    save_to_disk directory's) name, the sha256 of its bytes (a directory: of its files, in name order)
    and how many problems it held."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return {"name": p.name, "sha256": h.hexdigest(), "problems": problems}


def train_tiny_chat(cfg: TinyChatTrainConfig, out_dir: str | Path, data: str | Path, progress: bool = True) -> Path:
    """Train tiny-chat from scratch into ``out_dir`` on the GSM8K problems at ``data`` (a JSONL file or a
    ``save_to_disk`` directory); seeded: the same data and settings give the same model on one machine."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    problems = load_gsm8k(data)
    texts = [p.question for p in problems] + [chat_solution(p.gold_steps) for p in problems] + [SYSTEM_PROMPT, "Yes", "No"]
    tokenizer = build_chat_tokenizer(texts, cfg.vocab_size)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
    )
    examples = _examples(tokenizer, problems, cfg.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    pad = tokenizer.pad_token_id
    model.train()
    t0, loss_ema = time.time(), None
    bar = tqdm(range(cfg.steps), desc="train-chat", disable=not progress)
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [examples[rng.randrange(len(examples))] for _ in range(cfg.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (x, y) in enumerate(batch):  # right padding: positions 0..L-1, as in training any causal LM
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}")
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _template_into_config(out)
    meta = {
        "config": asdict(cfg),
        "data": describe_data(data, len(problems)),
        "final_loss_ema": loss_ema,
        "train_seconds": round(time.time() - t0, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _template_into_config(out: Path) -> None:
    """Keep the chat template in tokenizer_config.json (where every transformers version reads it), not in
    the separate chat_template.jinja that newer versions write."""
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
