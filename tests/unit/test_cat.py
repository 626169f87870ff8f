"""CaT and its baselines on scripted proposers whose right answers are known."""

import math

import pytest

from caspo.core.contract import ProposedStep
from caspo.core.search import NO_CONFIDENT_ANSWER, Search, SearchConfig, answer_key, run_searches, search


def cand(text, c, p=None):
    """A proposed step whose entropy multiplier is exactly c (one token with H = -log c)."""
    return ProposedStep(text, (-math.log(c),), (math.log(p if p is not None else c),))


class Scripted:
    """Returns the scripted candidates for a prefix (first n of them), recording every call."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def propose(self, prefixes, n, temperature):
        self.calls.append((len(prefixes), n, temperature))
        out = []
        for p in prefixes:
            options = self.script[p.steps]
            out.append([options[i % len(options)] for i in range(n)])
        return out


def test_cat_prunes_keeps_top_k_and_answers_highest_C():
    script = {
        (): [cand("a", 0.9), cand("b", 0.8), cand("c", 0.3)],  # c: C=0.3 < tau → pruned
        ("a",): [cand("#### 1", 0.6), cand("a2", 0.95)],  # a→#### 1: C=0.54
        ("b",): [cand("#### 2", 0.95), cand("b2", 0.5)],  # b→#### 2: C=0.76; b2: C=0.40 < tau
        ("a", "a2"): [cand("#### 3", 0.9)],  # C = 0.9*0.95*0.9 = 0.7695 > 0.76
    }
    res = search("q", Scripted(script), SearchConfig(method="cat", k=3, tau=0.45), with_tree=True)
    assert res.answer == "3"
    assert res.steps == ("a", "a2", "#### 3")
    assert res.confidence == pytest.approx(0.9 * 0.95 * 0.9)
    assert res.entropy_confidence == pytest.approx(res.confidence)
    assert res.branches_pruned == 2  # c at depth 1, b2 at depth 2
    assert res.branches_completed == 3
    statuses = {n["step"]: n["status"] for n in res.tree}
    assert statuses["c"] == "pruned" and statuses["b2"] == "pruned" and statuses["#### 2"] == "completed"


def test_cat_top_k_retention_drops_the_least_confident():
    script = {
        (): [cand("a", 0.9), cand("c", 0.8)],
        ("a",): [cand("a1", 0.9), cand("a2", 0.5)],  # C: 0.81, 0.45
        ("c",): [cand("c1", 0.95), cand("c2", 0.9)],  # C: 0.76, 0.72 → top 2 are a1, c1
        ("a", "a1"): [cand("#### 1", 0.5)],  # 0.405
        ("c", "c1"): [cand("#### 3", 0.9)],  # 0.684
        ("c", "c2"): [cand("#### 2", 1.0)],  # 0.72 would win, but c2 is outside the top 2
    }
    res = search("q", Scripted(script), SearchConfig(method="cat", k=2, tau=0.0), with_tree=True)
    assert res.answer == "3"
    assert res.branches_dropped == 2
    status = {n["step"]: n["status"] for n in res.tree}
    assert status["c2"] == "dropped" and status["a2"] == "dropped" and status["a1"] == "expanded"


def test_cat_no_confident_answer_when_every_branch_dies():
    script = {(): [cand("a", 0.5), cand("b", 0.4)], ("a",): [cand("#### 1", 0.5)]}
    res = search("q", Scripted(script), SearchConfig(method="cat", k=2, tau=0.6))
    assert res.answer is None and res.reason == NO_CONFIDENT_ANSWER and res.confidence == 0.0
    assert res.branches_pruned == 2


def test_cat_answers_a_completed_branch_below_tau():
    # Algorithm 2, lines 10-13: a step with a final answer joins the answer set whatever its C; τ prunes
    # only branches that go on. "#### 1" ends at C = 0.4 < τ = 0.5 and is the answer; "b" (C = 0.3) is pruned.
    script = {(): [cand("#### 1", 0.4), cand("b", 0.3)]}
    res = search("q", Scripted(script), SearchConfig(method="cat", k=2, tau=0.5), with_tree=True)
    assert res.answer == "1" and res.reason == "" and res.confidence == pytest.approx(0.4)
    assert res.branches_completed == 1 and res.branches_pruned == 1
    assert {n["step"]: n["status"] for n in res.tree} == {"#### 1": "completed", "b": "pruned"}


def test_cat_max_steps_truncates():
    script = {(): [cand("a", 0.99)], ("a",): [cand("a", 0.99)], ("a", "a"): [cand("a", 0.99)]}
    res = search("q", Scripted(script), SearchConfig(method="cat", k=1, tau=0.0, max_steps=2))
    assert res.answer is None and res.reason == NO_CONFIDENT_ANSWER


def test_cat_merges_identical_siblings():
    script = {(): [cand("a", 0.9)], ("a",): [cand("#### 1", 0.9)]}
    res = search("q", Scripted(script), SearchConfig(method="cat", k=4, tau=0.1), with_tree=True)
    assert res.answer == "1"
    assert [n["step"] for n in res.tree] == ["a", "#### 1"]
    assert res.steps_proposed == 8  # all samples are counted, duplicates are merged


def test_cat_stops_early_when_no_active_branch_can_win():
    script = {
        (): [cand("#### 7", 0.9), cand("a", 0.8)],
        ("a",): [cand("#### 8", 1.0)],  # could never beat 0.9: C <= 0.8
    }
    p = Scripted(script)
    res = search("q", p, SearchConfig(method="cat", k=2, tau=0.0))
    assert res.answer == "7" and len(p.calls) == 1


def test_greedy_is_one_branch_at_temperature_zero():
    script = {(): [cand("a", 0.2)], ("a",): [cand("#### 5", 0.2)]}
    p = Scripted(script)
    res = search("q", p, SearchConfig(method="greedy", k=10, tau=0.9))
    assert res.answer == "5"  # greedy never prunes
    assert p.calls == [(1, 1, 0.0), (1, 1, 0.0)]


def test_self_consistency_majority_vote():
    # chains split at step 1 into 5 samples, then each continues alone
    script = {
        (): [cand("x", 0.9), cand("y", 0.5), cand("z", 0.5), cand("w", 0.99), cand("v", 0.5)],
        ("x",): [cand("#### 1", 0.9)],
        ("y",): [cand("#### 2", 0.9)],
        ("z",): [cand("#### 2.0", 0.9)],  # same answer as 2 numerically
        ("w",): [cand("#### 1", 0.9)],
        ("v",): [cand("#### 2", 0.9)],
    }
    p = Scripted(script)
    res = search("q", p, SearchConfig(method="sc", k=5, temperature=0.7))
    assert res.answer in ("2", "2.0")
    assert res.votes == {"2": 3, "1": 2}
    assert p.calls[0] == (1, 5, 0.7) and p.calls[1] == (5, 1, 0.7)


@pytest.mark.parametrize("answer,key", [("30", "30"), ("30.0", "30"), ("2.50", "2.5"), ("-3", "-3"), ("$1,200", "1200"), ("-0", "0"), ("Paris ", "paris")])
def test_answer_key_is_a_plain_canonical_number(answer, key):
    assert answer_key(answer) == key  # Decimal.normalize alone wrote 30 as 3E+1


def test_self_consistency_votes_under_plain_numbers():
    script = {
        (): [cand("x", 0.9), cand("y", 0.5), cand("z", 0.5)],
        ("x",): [cand("#### 30", 0.9)],
        ("y",): [cand("#### 30.0", 0.9)],
        ("z",): [cand("#### 2.50", 0.9)],
    }
    res = search("q", Scripted(script), SearchConfig(method="sc", k=3, temperature=0.7))
    assert res.votes == {"30": 2, "2.5": 1} and res.answer == "30"


def test_self_consistency_tie_goes_to_most_confident_then_earliest():
    script = {
        (): [cand("x", 0.5), cand("y", 0.9), cand("z", 0.5), cand("w", 0.5)],
        ("x",): [cand("#### 1", 0.9)],
        ("y",): [cand("#### 2", 0.9)],
        ("z",): [cand("#### 1", 0.9)],
        ("w",): [cand("#### 2", 0.9)],
    }
    assert search("q", Scripted(script), SearchConfig(method="sc", k=4)).answer == "2"
    even = {k: [cand(c.text, 0.5) for c in v] for k, v in script.items()}
    assert search("q", Scripted(even), SearchConfig(method="sc", k=4)).answer == "1"


def test_best_of_k_by_confidence_and_logprob_scoring():
    script = {
        (): [cand("x", 0.9, p=0.2), cand("y", 0.6, p=0.9)],
        ("x",): [cand("#### 1", 0.9, p=0.9)],
        ("y",): [cand("#### 2", 0.9, p=0.9)],
    }
    ent = search("q", Scripted(script), SearchConfig(method="bon", k=2, scoring="entropy"))
    lp = search("q", Scripted(script), SearchConfig(method="bon", k=2, scoring="logprob"))
    assert ent.answer == "1" and lp.answer == "2"
    assert lp.confidence == pytest.approx(0.81) and lp.entropy_confidence == pytest.approx(0.54)
    prod = search("q", Scripted(script), SearchConfig(method="cat", k=2, tau=0.0, scoring="product"))
    assert prod.answer == "2" and prod.confidence == pytest.approx(0.6 * 0.9 * 0.9 * 0.9)  # 0.437 > 0.9*0.2*0.81


def test_run_searches_batches_questions_into_one_call_per_step():
    script = {(): [cand("a", 0.9)], ("a",): [cand("#### 1", 0.9)]}
    p = Scripted(script)
    searches = [Search(f"q{i}", SearchConfig(method="greedy")) for i in range(5)]
    results = run_searches(searches, p)
    assert [r.answer for r in results] == ["1"] * 5
    assert p.calls == [(5, 1, 0.0), (5, 1, 0.0)]


def test_dead_branches_do_not_answer():
    script = {(): [ProposedStep("a", (0.1,), (-0.1,), ended=True), ProposedStep("", (0.1,), (-0.1,), ended=True)]}
    res = search("q", Scripted(script), SearchConfig(method="cat", k=2, tau=0.0))
    assert res.answer is None


@pytest.mark.parametrize(
    "kwargs, field",
    [({"method": "beam"}, "method"), ({"k": 0}, "k"), ({"tau": 1.5}, "tau"), ({"scoring": "x"}, "scoring"), ({"max_steps": 0}, "max_steps")],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SearchConfig(**kwargs)


# ---- streaming: committed steps ------------------------------------------------------------------
import asyncio  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from caspo.core.search import CommittedStep, SearchResult, stream_search  # noqa: E402


class AsyncScripted(Scripted):
    """The scripted proposer behind ``await``; records how many steps had been streamed at each call."""

    def __init__(self, script, seen=None):
        super().__init__(script)
        self.seen = seen if seen is not None else []
        self.streamed_at_call = []

    async def propose(self, prefixes, n, temperature):
        self.streamed_at_call.append(len(self.seen))
        return Scripted.propose(self, prefixes, n, temperature)


def _stream(question, proposer, cfg):
    async def go():
        events = []
        async for ev in stream_search(Search(question, cfg), proposer):
            events.append(ev)
            if isinstance(ev, CommittedStep):
                proposer.seen.append(ev)
        return events

    return asyncio.run(go())


def test_stream_sends_a_step_once_every_branch_shares_it():
    script = {
        (): [cand("a", 0.9), cand("b", 0.2)],  # b pruned at tau 0.5: "a" is committed after step 1
        ("a",): [cand("x", 0.9), cand("y", 0.8)],  # two live branches: nothing new committed
        ("a", "x"): [cand("#### 1", 0.9)],
        ("a", "y"): [cand("#### 2", 0.9)],
    }
    proposer = AsyncScripted(script)
    events = _stream("q", proposer, SearchConfig(method="cat", k=2, tau=0.5))
    *steps, result = events
    assert isinstance(result, SearchResult) and result.answer == "1"
    assert [s.text for s in steps] == list(result.steps) == ["a", "x", "#### 1"]
    assert [s.index for s in steps] == [0, 1, 2]
    assert steps[0].confidence == pytest.approx(0.9) and steps[1].cumulative == pytest.approx(0.81)
    # "a" went out before the search asked for its second and third proposals
    assert proposer.streamed_at_call == [0, 1, 1]


@settings(max_examples=60, deadline=None)
@given(
    st.data(),
    st.sampled_from(["cat", "greedy", "sc", "bon"]),
    st.integers(1, 3),
    st.floats(0.0, 0.9),
)
def test_streamed_steps_are_always_the_reported_path(data, method, k, tau):
    """Whatever the tree, the steps streamed are exactly the result's steps, in order."""
    texts = ["a", "b", "c", "#### 1", "#### 2"]

    class RandomProposer:
        seen: list = []
        streamed_at_call: list = []

        async def propose(self, prefixes, n, temperature):
            out = []
            for p in prefixes:
                row = []
                for _ in range(n):
                    text = "#### 3" if len(p.steps) >= 3 else data.draw(st.sampled_from(texts))
                    row.append(cand(text, data.draw(st.floats(0.05, 1.0))))
                out.append(row)
            return out

    cfg = SearchConfig(method=method, k=k, tau=tau, temperature=0.0 if method == "greedy" else 0.7, max_steps=5)
    *steps, result = _stream("q", RandomProposer(), cfg)
    assert tuple(s.text for s in steps) == result.steps
    assert [s.index for s in steps] == list(range(len(steps)))


@pytest.mark.parametrize("method", ["cat", "sc", "bon"])
def test_k_samples_at_temperature_zero_are_refused_for_every_sampling_method(method):
    """Found by the long fuzz run: CaT with k > 1 at temperature 0 reached the backend (n > 1 greedy)."""
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SearchConfig(method=method, k=2, temperature=0.0)
    assert SearchConfig(method=method, k=1, temperature=0.0).k == 1
    assert SearchConfig(method="greedy", k=4, temperature=0.0).method == "greedy"


def test_tree_events_grow_the_same_tree_the_result_reports():
    """With tree_events, the updates (new or changed nodes after each model call) add up to the
    result's tree; pruned and dropped nodes say why, and no update repeats an unchanged node."""
    from caspo.core.search import TreeUpdate

    script = {
        (): [cand("a", 0.9), cand("b", 0.8), cand("c", 0.3)],  # c: under tau
        ("a",): [cand("a1", 0.9), cand("a2", 0.95)],
        ("b",): [cand("b1", 0.9), cand("b2", 0.95)],  # width 2: b's children are outranked by a's
        ("a", "a1"): [cand("#### 1", 0.9)],
        ("a", "a2"): [cand("#### 2", 0.9)],
    }

    async def go():
        return [ev async for ev in stream_search(Search("q", SearchConfig(method="cat", k=3, tau=0.45, width=2)), AsyncScripted(script), with_tree=True, tree_events=True)]

    events = asyncio.run(go())
    result = events[-1]
    updates = [ev for ev in events if isinstance(ev, TreeUpdate)]
    assert len(updates) == 3  # one per step of the search
    grown: dict[int, dict] = {}
    for u in updates:
        assert all(grown.get(d["id"]) != d for d in u.nodes)
        grown.update((d["id"], d) for d in u.nodes)
    assert list(grown.values()) == sorted(result.tree, key=lambda d: d["id"]) == result.tree
    why = {d["step"]: (d["status"], d["reason"]) for d in result.tree}
    assert why["c"] == ("pruned", "under_tau")
    assert why["b1"] == why["b2"] == ("dropped", "width")
    assert result.answer == "2"
    # without tree_events the stream is what it was: steps, then the result
    plain = asyncio.run(_async_list(stream_search(Search("q", SearchConfig(method="cat", k=3, tau=0.45, width=2)), AsyncScripted(script))))
    assert not any(isinstance(ev, TreeUpdate) for ev in plain) and plain[-1].answer == "2"


def test_adaptive_tree_marks_the_uncertainty_that_expanded_a_branch():
    """Each node carries its parent's probe uncertainty (what branch_threshold was compared with): the
    root's unsure probe (H 0.9 > 0.5) expanded it into two steps; the sure probe under "b" did not."""
    from caspo.core.search import TreeUpdate

    def step(text, h):
        return ProposedStep(text, (h,), (-h,))

    script = {(): [step("b", 0.9), step("a", 0.7)], ("b",): [step("#### 3", 0.05)], ("a",): [step("#### 4", 0.05)]}
    cfg = SearchConfig(method="cat", k=2, tau=0.0, branching="adaptive", branch_threshold=0.5, uncertainty="first_entropy", width=2)

    class ProbeThenSample:  # the greedy probe is a prefix's first scripted step, a sample its last
        async def propose(self, prefixes, n, temperature):
            return [[script[p.steps][0 if temperature == 0 else -1]] * n for p in prefixes]

    async def go():
        return [ev async for ev in stream_search(Search("q", cfg), ProbeThenSample(), tree_events=True)]

    nodes: dict[int, dict] = {}
    for ev in asyncio.run(go()):
        if isinstance(ev, TreeUpdate):
            nodes.update((d["id"], d) for d in ev.nodes)
    by_step = {d["step"]: d for d in nodes.values()}
    assert by_step["b"]["branched"] and by_step["a"]["branched"]
    assert by_step["b"]["uncertainty"] == by_step["a"]["uncertainty"] == pytest.approx(0.9)
    assert not by_step["#### 3"]["branched"] and by_step["#### 3"]["uncertainty"] == pytest.approx(0.05)


async def _async_list(agen):
    return [ev async for ev in agen]
