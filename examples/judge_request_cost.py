"""The judge before and after issue 24 on the CPU (HF backend, tiny-chat): two full teacher-forced rows per item
(prompt + "Yes", prompt + "No", every position scored) against one row per item scoring only the answer position.
Run: PYTHONPATH=. python examples/judge_request_cost.py"""
import json, time, statistics
from caspo.models.hf import HFBackend
from caspo.models.prompting import prompter_for_backend
from caspo.tasks import get_task
from caspo.tasks.critic import JUDGE_SYSTEM, judge_question
from caspo.core.confidence import verdict_probability
from caspo.config import load_config
cfg = load_config(None, ["model.policy=tiny-chat"]); m = cfg.model
b = HFBackend("tiny-chat", delimiter=m.step_delimiter, prompt_format=m.prompt_format, device="cpu")
task = get_task("arith"); pr = prompter_for_backend(b, task)
probs = task.problems(64, seed=5, split="test")
prompts = [pr.chat(JUDGE_SYSTEM, judge_question(p.question, [], p.gold_steps[0])) for p in probs]
old_t, new_t = [], []
for rep in range(3):
    t = time.perf_counter(); sc = b.score_steps(prompts * 2, ["Yes"] * 64 + ["No"] * 64); old_t.append(time.perf_counter() - t)
    t = time.perf_counter(); an = b.answer_logprobs(prompts, ["Yes", "No"]); new_t.append(time.perf_counter() - t)
old_p = [verdict_probability(sc[i].token_logprobs[0], sc[64 + i].token_logprobs[0]) for i in range(64)]
new_p = [verdict_probability(y, n) for y, n in an]
tok = b.tokenizer
print(json.dumps({"items": 64, "old_rows": 128, "new_rows": 64, "prompt_tokens_mean": statistics.fmean(len(tok.encode(p, add_special_tokens=False)) for p in prompts),
  "old_s_median": statistics.median(old_t), "new_s_median": statistics.median(new_t), "max_abs_p_yes_diff": max(abs(a - c) for a, c in zip(old_p, new_p))}))
