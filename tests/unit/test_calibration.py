"""Warm-up calibration: the rule by hand, the file and its errors, the config's cat defaults, and a
calibration run on a scripted model whose right and wrong steps are known."""

import dataclasses
import json
import math

import pytest

from caspo.config import CatConfig, ConfigError, load_config
from caspo.models.calibration_file import Calibration, CalibrationError, read_calibration, write_calibration
from caspo.core.calibration import choose_point, threshold_grid
from caspo.core.contract import ProposedStep
from caspo.evaluation import calibrate, evaluate_with
from caspo.tasks.base import Judgement, Problem


def test_threshold_grid_is_quantiles_of_the_steps_plus_inf():
    u = [0.1] * 6 + [0.5, 0.5, 1.0, 2.0]  # sorted; lower empirical quantile: index floor(q * 9)
    assert threshold_grid(u, (0.5, 0.75, 0.9, 0.95)) == [0.1, 0.5, 1.0, math.inf]  # idx 4, 6, 8, 8
    assert threshold_grid([], (0.5,)) == [math.inf]


def test_choose_point_by_hand():
    pts = [
        {"branch_threshold": math.inf, "tau": 0.0, "accuracy": 0.60, "tokens": 10},
        {"branch_threshold": 1.0, "tau": 0.0, "accuracy": 0.65, "tokens": 14},
        {"branch_threshold": 1.0, "tau": 0.2, "accuracy": 0.65, "tokens": 14},  # tie: the smaller tau wins
        {"branch_threshold": 0.5, "tau": 0.0, "accuracy": 0.70, "tokens": 25},  # over a budget of 20
    ]
    assert choose_point(pts, 20) == pts[1]
    assert choose_point(pts, 30) == pts[3]
    assert choose_point(pts, 5) == pts[0]  # nothing fits: the cheapest


def test_calibration_file_round_trip_and_errors(tmp_path):
    p = write_calibration(tmp_path / "c.json", {"tau": 0.2, "branch_threshold": math.inf, "uncertainty": "max_entropy", "grid": []})
    assert json.loads(p.read_text())["branch_threshold"] == "inf"
    assert read_calibration(p) == Calibration(0.2, math.inf, "max_entropy", str(p))
    with pytest.raises(CalibrationError, match="does not exist"):
        read_calibration(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    for text, needle in [
        ("{not json", "is not readable JSON"),
        ("[1]", "must hold a JSON object"),
        ('{"tau": 0.1, "uncertainty": "max_entropy"}', "branch_threshold is missing"),
        ('{"tau": 1.5, "branch_threshold": 0.3, "uncertainty": "max_entropy"}', "tau must be a number in [0, 1], got 1.5"),
        ('{"tau": 0.1, "branch_threshold": -1, "uncertainty": "max_entropy"}', "branch_threshold must be a number >= 0"),
        ('{"tau": 0.1, "branch_threshold": 0.3, "uncertainty": "vibes"}', "uncertainty must be one of"),
    ]:
        bad.write_text(text)
        with pytest.raises(CalibrationError) as e:
            read_calibration(bad)
        assert needle in str(e.value) and str(bad) in str(e.value)


def test_cat_section_defaults_calibration_and_algorithm_2():
    cat = CatConfig()
    cfg = cat.search_config()
    assert (cfg.method, cfg.branching, cfg.scoring, cfg.prune_scoring, cfg.width) == ("cat", "adaptive", "logprob", "entropy", 1)
    cal = Calibration(0.3, 1.25, "first_entropy")
    c = cat.search_config(cal, seed=5)
    assert (c.tau, c.branch_threshold, c.uncertainty, c.seed) == (0.3, 1.25, "first_entropy", 5)
    assert cat.search_config(cal, tau=0.1).tau == 0.1  # the request's own wins
    a2 = cat.search_config(cal, branching="always", scoring="entropy", k=10, tau=0.5)
    assert (a2.width, a2.prune_scoring, a2.tau, a2.k) == (None, None, 0.5, 10)  # Algorithm 2, no calibration


@pytest.mark.parametrize(
    "override, needle",
    [
        ("cat.tau=2", "cat.tau must be in [0, 1]"),
        ("cat.branching=sometimes", "cat.branching must be one of always, adaptive"),
        ("cat.branch_threshold=-0.5", "cat.branch_threshold must be a number >= 0"),
        ("cat.scoring=critic", "may not be critic"),
        ("cat.k=64", "cat.k must be in [1, serve.max_k=32]"),
        ("cat.width=0", "cat.width must be an integer >= 1"),
    ],
)
def test_bad_cat_section_names_field_and_limit(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_the_shipped_config_holds_the_recommended_cat():
    # the defaults, with the threshold `caspo calibrate --model tiny -n 300` chose on the shipped model
    # (every threshold at 1.000 on the warm-up problems: never branching is the cheapest)
    cfg = load_config("configs/tiny-cpu.yaml")
    assert cfg.cat == dataclasses.replace(CatConfig(), branch_threshold=math.inf)


# ---- calibration on a scripted model: half the problems have an unsure, wrong greedy first step -----------
class Task:
    name = "scripted"

    def prompt(self, q):
        return q

    def judge(self, problem, prefix, step):
        ok = step in ("a=1", "#### 1")
        return Judgement(ok, "a=1" if not prefix else "#### 1", "" if ok else "wrong")

    def answer_correct(self, problem, answer):
        return answer == "1"


def step(text, h, lp):
    return ProposedStep(text, tuple(h), tuple(lp))


class Model:
    """Easy questions: a sure, right greedy step (first-token entropy 0.1). Hard ones: the greedy first step
    is wrong and unsure (1.0); a sample is right with a better mean log-prob."""

    def propose(self, prefixes, n, temperature):
        out = []
        for p in prefixes:
            hard = p.question.startswith("hard")
            if not p.steps:
                right = step("a=1", (1.0 if hard else 0.1, 0.1), (math.log(0.9), 0.0))
                greedy = step("a=2", (1.0, 0.1), (math.log(0.5), 0.0)) if hard else step("a=1", (0.1, 0.1), (0.0, 0.0))
                out.append([greedy] if temperature == 0 else [right] * n)
            else:
                last = p.steps[-1][-1]
                out.append([step(f"#### {last}", (0.1,), (0.0,))] * n)
        return out


def test_calibration_recovers_the_threshold_between_right_and_wrong_steps(tmp_path):
    task = Task()
    problems = [Problem(f"p{i}", f"{'hard' if i % 2 else 'easy'}{i}", "1") for i in range(20)]
    base = CatConfig(k=2).search_config(seed=0, uncertainty="first_entropy")
    res = calibrate(Model(), task, problems, base, taus=(0.0, 0.2, 0.4), quantiles=(0.5, 0.75, 0.9))
    # greedy steps: 30 at 0.1 (both steps of easy ones, the second of hard ones) and 10 at 1.0: grid 0.1, 1.0, inf
    assert [p["branch_threshold"] for p in res["grid"]][::3] == [0.1, 1.0, math.inf]
    assert 0.1 <= res["branch_threshold"] < 1.0 and res["tau"] == 0.0
    assert res["warmup"]["greedy_accuracy"] == 0.5 and res["warmup"]["accuracy"] == 1.0
    # greedy: 3 tokens a question; branching at the hard first step adds the one sample's 2 tokens
    assert res["warmup"]["greedy_tokens"] == 3 and res["warmup"]["tokens"] == 4
    path = write_calibration(tmp_path / "calibration.json", res)
    cal = read_calibration(path)
    rep = evaluate_with(Model(), task, problems, CatConfig(k=2).search_config(cal, seed=0))
    assert rep.accuracy == 1.0 and rep.branch_points == 0.5
