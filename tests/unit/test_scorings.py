"""The scoring registry and adaptive branching, against values worked out by hand on scripted proposers."""

import math

import pytest

from caspo.core.contract import ProposedStep
from caspo.core.search import SearchConfig, search
from caspo.core.confidence import CRITIC_FLOOR, SCORINGS, StepSignal, log_path_score, log_step_score, step_uncertainty

# a two-step path: step 1 has tokens with H = 0.2, 0.4 and p = 0.5, 1.0; step 2 (the answer) H = 0.6, p = 0.8
S1 = StepSignal((0.2, 0.4), (math.log(0.5), 0.0), final=False, verdict=1.0)
S2 = StepSignal((0.6,), (math.log(0.8),), final=True, verdict=0.0)


@pytest.mark.parametrize(
    "scoring, window, want",
    [
        ("entropy", 16, -(0.3 + 0.6)),  # sum of -mean H per step
        ("logprob", 16, math.log(0.5) / 2 + math.log(0.8)),  # sum of mean log p per step
        ("product", 16, -0.9 + math.log(0.5) / 2 + math.log(0.8)),
        ("crew", 16, math.log(0.8)),  # mean p over the answer step's tokens
        ("gmean", 16, -0.9 / 2),  # mean over the 2 steps of -mean H
        ("group", 16, -(0.2 + 0.4 + 0.6) / 3),  # one window (path shorter than 16 tokens)
        ("group", 2, -0.5),  # windows [0.2, 0.4] -> 0.3 and [0.4, 0.6] -> 0.5; the worst is 0.5
        ("group", 1, -0.6),  # the single most uncertain token
        ("critic", 16, math.log(1.0) + math.log(CRITIC_FLOOR)),
    ],
)
def test_path_scores_by_hand(scoring, window, want):
    assert log_path_score(scoring, [S1, S2], window) == pytest.approx(want)


def test_one_step_scores_by_hand():
    e, lp = S1.token_entropies, S1.token_logprobs
    assert log_step_score("entropy", e, lp) == pytest.approx(-0.3)
    assert log_step_score("logprob", e, lp) == pytest.approx(math.log(0.5) / 2)
    assert log_step_score("crew", e, lp) == pytest.approx(math.log(0.75))  # (0.5 + 1.0) / 2: the latest step's tokens
    assert log_step_score("gmean", e, lp) == pytest.approx(log_step_score("entropy", e, lp))
    assert log_step_score("group", e, lp) == pytest.approx(-0.3)
    assert log_path_score("entropy", []) == 0.0


def test_critic_without_a_verdict_and_unknown_scoring_say_what_is_wrong():
    with pytest.raises(ValueError, match="critic"):
        log_path_score("critic", [StepSignal((0.1,), (0.0,))])
    with pytest.raises(ValueError, match="scoring must be one of"):
        log_path_score("nope", [S1])
    with pytest.raises(ValueError, match="window must be"):
        log_path_score("group", [S1], 0)


def test_uncertainty_measures():
    h = (0.9, 0.1, 0.2)
    assert step_uncertainty("first_entropy", h) == pytest.approx(0.9)
    assert step_uncertainty("mean_entropy", h) == pytest.approx(0.4)
    assert step_uncertainty("max_entropy", (0.1, 0.7, 0.2)) == pytest.approx(0.7)
    assert step_uncertainty("first_entropy", ()) == 0.0
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        step_uncertainty("median", h)


# ---- the scorings inside the search -------------------------------------------------------------------
def cand(text, c, p=None, h_first=None, verdict=None):
    """One-token step with entropy multiplier c (H = -log c) and probability p; ``h_first`` prepends a
    token of that entropy (and probability 1) to set the step's first-token entropy."""
    h, lp = (-math.log(c),), (math.log(p if p is not None else c),)
    if h_first is not None:
        h, lp = (h_first, *h), (0.0, *lp)
    return ProposedStep(text, h, lp, verdict=verdict)


class Scripted:
    """script[steps] = (greedy step, [samples]): temperature 0 gives the greedy step, else the first n samples
    (cycling). Records (prefixes, n, temperature) of every call."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def propose(self, prefixes, n, temperature):
        self.calls.append((len(prefixes), n, temperature))
        out = []
        for p in prefixes:
            greedy, samples = self.script[p.steps]
            out.append([greedy] if temperature == 0 else [samples[i % len(samples)] for i in range(n)])
        return out


def test_bon_gmean_does_not_favour_short_paths():
    # chain A: "#### 1" at c 0.5; chain B: three steps at c 0.7 each (C = 0.343, geometric mean 0.7)
    script = {
        (): (None, [cand("#### 1", 0.5), cand("a", 0.7)]),
        ("a",): (None, [cand("b", 0.7)]),
        ("a", "b"): (None, [cand("#### 2", 0.7)]),
    }
    ent = search("q", Scripted(script), SearchConfig(method="bon", k=2, scoring="entropy"))
    gm = search("q", Scripted(script), SearchConfig(method="bon", k=2, scoring="gmean"))
    assert ent.answer == "1" and ent.confidence == pytest.approx(0.5)
    assert gm.answer == "2" and gm.confidence == pytest.approx(0.7)


def test_bon_crew_picks_the_answer_the_model_is_surest_of():
    # same entropy everywhere; the answer tokens' probabilities differ: 0.6 vs 0.9
    script = {(): (None, [cand("#### 1", 0.8, p=0.6), cand("#### 2", 0.8, p=0.9)])}
    res = search("q", Scripted(script), SearchConfig(method="bon", k=2, scoring="crew"))
    assert res.answer == "2" and res.confidence == pytest.approx(0.9)


def test_weighted_vote_against_majority():
    # answer 1 once at C 0.9; answer 2 twice at C 0.4 each: majority says 2, the weights 0.9 vs 0.8 say 1
    script = {(): (None, [cand("#### 1", 0.9), cand("#### 2", 0.4), cand("#### 2", 0.4)])}
    sc = search("q", Scripted(script), SearchConfig(method="sc", k=3))
    wsc = search("q", Scripted(script), SearchConfig(method="wsc", k=3))
    assert sc.answer == "2" and wsc.answer == "1"
    assert wsc.votes == {"1": 1, "2": 2}


def test_group_scoring_ranks_by_the_worst_window():
    # both chains have the same mean entropy over their tokens; B has one very unsure token
    script = {
        (): (None, [ProposedStep("#### 1", (0.5, 0.5), (0.0, 0.0)), ProposedStep("#### 2", (0.05, 0.95), (0.0, 0.0))]),
    }
    res = search("q", Scripted(script), SearchConfig(method="bon", k=2, scoring="group", window=1))
    assert res.answer == "1" and res.confidence == pytest.approx(math.exp(-0.5))


def test_critic_scoring_prunes_the_step_the_critic_rejects():
    # the wrong step is the more confident one; the critic's verdict prunes it (C = 1e-6 < tau)
    script = {
        (): (None, [cand("x=5", 0.95, verdict=0.0), cand("x=4", 0.6, verdict=1.0)]),
        ("x=5",): (None, [cand("#### 5", 1.0, verdict=1.0)]),
        ("x=4",): (None, [cand("#### 4", 1.0, verdict=1.0)]),
    }
    res = search("q", Scripted(script), SearchConfig(method="cat", k=2, tau=0.5, scoring="critic"))
    assert res.answer == "4" and res.branches_pruned == 1
    assert search("q", Scripted(script), SearchConfig(method="cat", k=2, tau=0.5, scoring="entropy")).answer == "5"


def test_critic_scoring_answers_with_the_final_step_the_critic_accepts():
    # final steps join the answer set whatever their C (Algorithm 2); the critic's rejection makes the
    # wrong one the least confident there (C = 1e-6), so the answer is the one it accepts
    script = {
        (): (None, [cand("#### 5", 0.95, verdict=0.0), cand("#### 4", 0.6, verdict=1.0)]),
    }
    res = search("q", Scripted(script), SearchConfig(method="cat", k=2, tau=0.5, scoring="critic"))
    assert res.answer == "4" and res.branches_completed == 2 and res.branches_pruned == 0
    assert search("q", Scripted(script), SearchConfig(method="cat", k=2, tau=0.5, scoring="entropy")).answer == "5"


# ---- adaptive branching ---------------------------------------------------------------------------------
# three steps; the probe's first-token entropy is 0.1, 0.9, 0.2 at steps 1, 2, 3
ADAPTIVE = {
    (): (cand("x=1", 0.9, h_first=0.1), [cand("x=2", 0.8)]),
    ("x=1",): (cand("y=1", 0.9, h_first=0.9), [cand("y=2", 0.95, p=0.99), cand("y=3", 0.5, p=0.4), cand("y=1", 0.9, h_first=0.9)]),
    ("x=1", "y=1"): (cand("#### 1", 0.9, h_first=0.2), [cand("#### 7", 0.9)]),
    ("x=1", "y=2"): (cand("#### 2", 0.9, h_first=0.2), [cand("#### 8", 0.9)]),
    ("x=1", "y=3"): (cand("#### 3", 0.9, h_first=0.2), [cand("#### 9", 0.9)]),
}


def test_adaptive_expands_exactly_where_the_probe_is_unsure():
    prop = Scripted(ADAPTIVE)
    cfg = SearchConfig(method="cat", k=4, tau=0.1, branching="adaptive", branch_threshold=0.5, scoring="logprob", width=1)
    res = search("q", prop, cfg, with_tree=True)
    # step 1 probe (sure), step 2 probe (unsure) + 3 siblings, step 3 probe of the one kept branch
    assert prop.calls == [(1, 1, 0.0), (1, 1, 0.0), (1, 3, 0.7), (1, 1, 0.0)]
    assert res.branch_points == 1
    assert [n["step"] for n in res.tree if n["branched"]] == ["y=1", "y=2", "y=3"]  # the duplicate y=1 is merged
    # siblings ranked by logprob (width 1): y=2 (p 0.99) beats the probe y=1 (mean log p of (1, 0.9)) and y=3
    assert res.steps == ("x=1", "y=2", "#### 2") and res.answer == "2"
    assert res.branches_dropped == 2


ALG2 = {
    (): (None, [cand("a", 0.9), cand("b", 0.8), cand("c", 0.3)]),
    ("a",): (None, [cand("#### 1", 0.6), cand("a2", 0.95)]),
    ("b",): (None, [cand("#### 2", 0.95), cand("b2", 0.5)]),
    ("a", "a2"): (None, [cand("#### 3", 0.9)]),
}


def test_adaptive_threshold_zero_is_algorithm_2():
    alg2 = SearchConfig(method="cat", k=3, tau=0.5, scoring="entropy", seed=1)
    adaptive = SearchConfig(method="cat", k=3, tau=0.5, scoring="entropy", seed=1, branching="adaptive", branch_threshold=0.0)
    a = search("q", Scripted(ALG2), alg2, with_tree=True)
    p = Scripted(ALG2)
    b = search("q", p, adaptive, with_tree=True)
    assert a.answer == "3" and a.branches_pruned == 2
    assert a == b
    assert all(n == 3 for _, n, _ in p.calls)


def test_adaptive_threshold_infinite_is_greedy():
    g = search("q", Scripted(ADAPTIVE), SearchConfig(method="greedy"))
    p = Scripted(ADAPTIVE)
    b = search("q", p, SearchConfig(method="cat", k=4, tau=0.0, branching="adaptive", branch_threshold=math.inf))
    assert (b.answer, b.steps, b.tokens_generated, b.steps_proposed) == (g.answer, g.steps, g.tokens_generated, g.steps_proposed)
    assert b.branch_points == 0 and all(n == 1 and t == 0.0 for _, n, t in p.calls)


def test_adaptive_with_one_candidate_is_greedy():
    g = search("q", Scripted(ADAPTIVE), SearchConfig(method="greedy"))
    p = Scripted(ADAPTIVE)
    b = search("q", p, SearchConfig(method="cat", k=1, tau=0.0, branching="adaptive", branch_threshold=0.5))
    assert (b.steps, b.tokens_generated, b.branch_points) == (g.steps, g.tokens_generated, 0)
    assert all(n == 1 and t == 0.0 for _, n, t in p.calls)


def test_adaptive_prunes_on_its_own_scoring():
    # ranked by logprob, pruned on entropy: y=2 has the best log-prob but entropy C 0.90*0.30 = 0.27 < 0.4: pruned;
    # the kept path x=1, y=1, #### 1 ends at entropy C exp(-(0.103 + 0.503 + 0.153)) = 0.469
    script = dict(ADAPTIVE)
    script[("x=1",)] = (cand("y=1", 0.9, h_first=0.9), [cand("y=2", 0.3, p=0.99)])
    cfg = SearchConfig(method="cat", k=2, tau=0.4, branching="adaptive", branch_threshold=0.5, scoring="logprob", prune_scoring="entropy", width=1)
    res = search("q", Scripted(script), cfg)
    assert res.steps == ("x=1", "y=1", "#### 1") and res.branches_pruned == 1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("branching", "sometimes", "branching must be one of always, adaptive"),
        ("branch_threshold", -0.1, "branch_threshold must be a number >= 0"),
        ("branch_threshold", math.nan, "branch_threshold must be a number >= 0"),
        ("uncertainty", "median", "uncertainty must be one of first_entropy, mean_entropy, max_entropy"),
        ("width", 0, "width must be an integer >= 1"),
        ("prune_scoring", "nope", "prune_scoring must be one of"),
        ("scoring", "nope", "scoring must be one of " + ", ".join(SCORINGS)),
        ("window", 0, "window must be an integer >= 1"),
    ],
)
def test_bad_search_settings_name_field_and_limit(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SearchConfig(method="cat", **{field: value})


# ---- critic scoring with the real arithmetic critic ------------------------------------------------------
def test_critic_guided_search_with_the_exact_arith_critic():
    from caspo.evaluation import JudgedProposer, evaluate_with, task_judge
    from caspo.tasks import get_task

    task = get_task("arith")
    problem = task.make_problem("2+3*4")
    # the policy is surer of a wrong first step; the critic prunes it, and the search follows the right one
    script = {
        (): (None, [cand("3*4=13; 2+13", 0.95), cand("3*4=12; 2+12", 0.7)]),
        ("3*4=12; 2+12",): (None, [cand("2+12=14", 0.9)]),
        ("3*4=13; 2+13",): (None, [cand("2+13=15", 0.9)]),
        ("3*4=12; 2+12", "2+12=14"): (None, [cand("#### 14", 0.9)]),
        ("3*4=13; 2+13", "2+13=15"): (None, [cand("#### 15", 0.9)]),
    }
    cfg = SearchConfig(method="cat", k=2, tau=0.5, scoring="critic", seed=0)
    proposer = JudgedProposer(Scripted(script), task_judge(task, [problem]))
    rep = evaluate_with(proposer, task, [problem], cfg)
    assert rep.accuracy == 1.0 and rep.records[0].steps == ["3*4=12; 2+12", "2+12=14", "#### 14"]
    assert proposer.judged == 6  # k = 2 candidates at each of 3 steps for the one surviving branch (the wrong one is pruned)
    # evaluate_with gives a critic scoring the task's critic by itself
    assert evaluate_with(Scripted(script), task, [problem], cfg).accuracy == 1.0
    assert evaluate_with(Scripted(script), task, [problem], SearchConfig(method="cat", k=2, tau=0.5, scoring="entropy", seed=0)).accuracy == 0.0
