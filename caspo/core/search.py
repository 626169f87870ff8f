"""The search: CaT inference (paper Algorithm 2) and the baselines it is compared with, on one code path.

A search is a small state machine: ``pending()`` says which prefixes need next-step proposals,
``feed()`` takes them. ``run_searches`` drives many searches together and batches every pending
proposal into one ``StepProposer.propose`` call per (samples, temperature) group, so a batch of
questions (or of concurrent requests, in Serve) costs one model call per step.

Methods (all through the same Search):
  * ``cat``    — each active branch proposes K steps; a step multiplies the branch's cumulative
                 confidence C by c; a step with a final answer puts its branch into the answer set
                 whatever its C (Algorithm 2, lines 10-11), an unfinished branch with C < τ is pruned
                 (line 12), the top K survivors by C stay active; answer = completed branch with the
                 highest C; none → "no confident answer" (docs/design.md §5).
  * ``greedy`` — one branch, temperature 0.
  * ``sc``     — K independent samples (self-consistency), majority vote on final answers.
  * ``bon``    — the same K samples, answer = completed sample with the highest C (best-of-K).
  * ``wsc``    — the same K samples, confidence-weighted vote: each answer gets the sum of its chains' C.

Branching (``cat`` only): ``always`` is Algorithm 2 as written (every live branch expands into K samples
at every step). ``adaptive`` first takes each live branch's greedy step (a probe); only where that step's
uncertainty (``step_uncertainty``: first-token, mean or largest token entropy) is above
``branch_threshold`` does the branch expand, into K candidates: the probe plus K−1 samples; elsewhere it
continues with the probe alone. ``branch_threshold`` 0 needs no probe and is Algorithm 2 exactly;
``inf`` never branches and is greedy (with τ pruning). ``width`` caps the live branches (default K),
``prune_scoring`` is the scoring τ prunes on (default: ``scoring``, as in Algorithm 2).

How a path is scored is pluggable (``caspo.core.confidence.log_path_score``: ``entropy``, the paper's
c = exp(-mean H) multiplied along the path; ``logprob``; ``product``; ``crew``; ``gmean``; ``group``;
``critic``) and reported. Scores are kept in log space. Whatever the scoring, each result also carries the entropy-based C of its answer branch, so
calibration is measured on the same quantity for every method.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from caspo.core.confidence import (
    CUMULATIVE,
    GROUP_WINDOW,
    SCORINGS,
    UNCERTAINTIES,
    StepSignal,
    log_path_score,
    log_step_multiplier,
    mean_entropy,
    step_uncertainty,
)
from caspo.core.contract import Prefix, ProposedStep, StepProposer, derive_seed
from caspo.core.steps import final_answer, number_text, parse_number

METHODS = ("greedy", "sc", "bon", "cat", "wsc")
BRANCHINGS = ("always", "adaptive")
NO_CONFIDENT_ANSWER = "no confident answer"
# why a branch stopped short of an answer (Node.reason): its C under prune_scoring fell below τ, it was
# outside the ``width`` most confident survivors, or it could no longer beat a completed answer
DROP_REASONS = ("under_tau", "width", "outranked")


@dataclass(frozen=True)
class SearchConfig:
    method: str = "cat"
    k: int = 4
    tau: float = 0.5
    max_steps: int = 12
    scoring: str = "entropy"
    temperature: float = 0.7
    seed: int | None = None
    branching: str = "always"  # cat: always (Algorithm 2) | adaptive
    branch_threshold: float = 0.0  # adaptive: expand where the probe's uncertainty (nats) is above this
    uncertainty: str = "first_entropy"  # adaptive: first_entropy | mean_entropy | max_entropy
    width: int | None = None  # cat: live branches kept after each step (None: k)
    prune_scoring: str | None = None  # the scoring τ prunes on (None: scoring)
    window: int = GROUP_WINDOW  # tokens per window of the ``group`` scoring

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau!r}")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.method != "greedy" and self.k > 1 and self.temperature == 0:
            raise ValueError(f"temperature must be > 0 for method {self.method} with k > 1 (the k samples would be identical)")
        if self.branching not in BRANCHINGS:
            raise ValueError(f"branching must be one of {', '.join(BRANCHINGS)}, got {self.branching!r}")
        t = self.branch_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
            raise ValueError(f"branch_threshold must be a number >= 0 (nats; inf: never branch), got {t!r}")
        if self.uncertainty not in UNCERTAINTIES:
            raise ValueError(f"uncertainty must be one of {', '.join(UNCERTAINTIES)}, got {self.uncertainty!r}")
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1):
            raise ValueError(f"width must be an integer >= 1 (or unset: k), got {self.width!r}")
        if self.prune_scoring is not None and self.prune_scoring not in SCORINGS:
            raise ValueError(f"prune_scoring must be one of {', '.join(SCORINGS)}, got {self.prune_scoring!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")

    @property
    def adaptive(self) -> bool:
        """Adaptive branching with a probe: cat, branching adaptive and threshold > 0 (with k = 1 the probe is
        the only candidate: greedy)."""
        return self.method == "cat" and self.branching == "adaptive" and self.branch_threshold > 0


@dataclass
class Node:
    id: int
    parent: int | None
    step: str
    depth: int
    log_c: float = 0.0  # log of this step's multiplier under the search's scoring
    log_C: float = 0.0  # log cumulative confidence of the path ending here
    log_C_entropy: float = 0.0  # the same under entropy scoring (for calibration)
    log_P: float = 0.0  # log score of the path ending here under the scoring τ prunes on
    signal: StepSignal | None = None  # what the scorings read about this step
    branched: bool = False  # the step was chosen among siblings at a branch point
    mean_entropy: float = 0.0
    mean_logprob: float = 0.0
    tokens: int = 0
    status: str = "active"  # active | expanded | completed | pruned | dropped | dead | truncated
    reason: str = ""  # why pruned or dropped: one of DROP_REASONS
    uncertainty: float | None = None  # adaptive: the parent's probe uncertainty that decided (vs branch_threshold) whether it branched

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "parent": self.parent,
            "step": self.step,
            "depth": self.depth,
            "c": math.exp(self.log_c),
            "C": math.exp(self.log_C),
            "mean_entropy": self.mean_entropy,
            "mean_logprob": self.mean_logprob,
            "tokens": self.tokens,
            "status": self.status,
            "branched": self.branched,
            "reason": self.reason,
            "uncertainty": self.uncertainty,
        }


@dataclass
class SearchResult:
    question: str
    method: str
    scoring: str
    answer: str | None
    confidence: float  # cumulative confidence C of the answer branch under ``scoring`` (0 if none)
    entropy_confidence: float  # the same branch's C under entropy scoring (0 if none)
    steps: tuple[str, ...]  # the answer branch; without an answer, the deepest branch explored
    step_mean_entropies: tuple[float, ...]
    step_confidences: tuple[float, ...]  # per step c = exp(-mean H)
    reason: str  # "" or NO_CONFIDENT_ANSWER
    steps_proposed: int = 0
    tokens_generated: int = 0
    branches_pruned: int = 0  # cumulative confidence fell below τ
    branches_dropped: int = 0  # survived τ but outside the top K
    branches_completed: int = 0
    branch_points: int = 0  # steps at which a branch expanded into several candidates
    votes: dict[str, int] = field(default_factory=dict)
    tree: list[dict] = field(default_factory=list)


def answer_key(answer: str) -> str:
    """Canonical form of a final answer for voting: the number as people write it (``30``, ``2.5``)
    if it is one, else trimmed lower-case text."""
    n = parse_number(answer)
    return number_text(n) if n is not None else answer.strip().lower()


@dataclass(frozen=True)
class Request:
    search: "Search"
    prefixes: list[Prefix]
    nodes: list[int]
    n: int
    temperature: float
    phase: str = "sample"  # sample: children of the step | probe: adaptive's greedy probe | expand: its siblings


class Search:
    """One question's search; see module doc. Not thread-safe; one driver feeds it."""

    def __init__(self, question: str, config: SearchConfig):
        self.question = question
        self.cfg = config
        self.nodes: list[Node] = [Node(0, None, "", 0, status="expanded")]
        self.active: list[int] = [0]
        self.completed: list[int] = []
        self.t = 0
        self.counters = Counter()
        c = config
        self._prune_scoring = c.prune_scoring or c.scoring
        self._probes: dict[int, ProposedStep] = {}  # adaptive: this step's greedy probe per live branch
        self._expand: list[int] = []  # adaptive: live branches whose probe was unsure
        self._uncertainty: dict[int, float] = {}  # adaptive: this step's probe uncertainty per live branch
        if c.method == "greedy":
            self._n_first, self._n_rest, self._tau, self._keep, self._temp = 1, 1, 0.0, 1, 0.0
        elif c.method == "cat":
            self._n_first, self._n_rest, self._tau, self._keep, self._temp = c.k, c.k, c.tau, c.width or c.k, c.temperature
        else:  # sc, bon, wsc: K independent chains that split at the first step and never branch again
            self._n_first, self._n_rest, self._tau, self._keep, self._temp = c.k, 1, 0.0, c.k, c.temperature

    # ---- protocol with the driver ----------------------------------------------------------
    @property
    def done(self) -> bool:
        return not self.active

    def path(self, node_id: int) -> list[Node]:
        out = []
        while node_id is not None and node_id != 0:
            node = self.nodes[node_id]
            out.append(node)
            node_id = node.parent
        return out[::-1]

    def _prefixes(self, nids: Sequence[int]) -> list[Prefix]:
        out = []
        for nid in nids:
            seed = None if self.cfg.seed is None else derive_seed(self.cfg.seed, nid)
            out.append(Prefix(self.question, tuple(n.step for n in self.path(nid)), seed))
        return out

    def pending(self) -> Request | None:
        if self.done:
            return None
        if self.cfg.adaptive:
            if self._expand:  # the unsure branches' siblings: K−1 samples beside the probe
                return Request(self, self._prefixes(self._expand), list(self._expand), self.cfg.k - 1, self._temp, "expand")
            return Request(self, self._prefixes(self.active), list(self.active), 1, 0.0, "probe")
        n = self._n_first if self.t == 0 else self._n_rest
        return Request(self, self._prefixes(self.active), list(self.active), n, self._temp)

    def feed(self, request: Request, proposals: Sequence[Sequence[ProposedStep]]) -> None:
        if len(proposals) != len(request.nodes):
            raise ValueError(f"expected proposals for {len(request.nodes)} prefixes, got {len(proposals)}")
        for cands in proposals:
            for cand in cands:
                self.counters["steps_proposed"] += 1
                self.counters["tokens_generated"] += cand.tokens
        if request.phase == "probe":
            self._probes = {nid: cands[0] for nid, cands in zip(request.nodes, proposals)}
            cfg = self.cfg
            self._uncertainty = {nid: step_uncertainty(cfg.uncertainty, self._probes[nid].token_entropies) for nid in request.nodes}
            self._expand = [nid for nid in request.nodes if cfg.k > 1 and self._uncertainty[nid] > cfg.branch_threshold]
            if self._expand:
                return  # the step finishes when the siblings arrive
            self._grow([(nid, [self._probes[nid]]) for nid in request.nodes], branched=set())
        elif request.phase == "expand":
            extra = dict(zip(request.nodes, proposals))
            self._expand = []
            self.counters["branch_points"] += len(extra)
            self._grow([(nid, [self._probes[nid], *extra.get(nid, [])]) for nid in self._probes], branched=set(extra))
        else:
            branched = set(request.nodes) if request.n > 1 else set()
            self.counters["branch_points"] += len(branched)
            self._grow(list(zip(request.nodes, proposals)), branched)

    def _grow(self, children: Sequence[tuple[int, Sequence[ProposedStep]]], branched: set[int]) -> None:
        """One step of the tree: each parent's candidates become nodes; prune, complete, keep the best."""
        self.t += 1
        self._probes = {}
        survivors: list[Node] = []
        for parent_id, cands in children:
            parent = self.nodes[parent_id]
            parent.status = "expanded"
            seen: set[str] = set()
            for cand in cands:
                text = cand.text.strip()
                # CaT merges identical siblings: K copies of one step would spend the whole budget on it
                if self.cfg.method == "cat":
                    if text in seen:
                        continue
                    seen.add(text)
                node = self._add(parent, cand, text)
                node.branched = parent_id in branched
                node.uncertainty = self._uncertainty.get(parent_id)
                if not text:
                    node.status = "dead"  # the model ended without a step
                    continue
                # Algorithm 2, lines 10-13: a step with a final answer joins the answer set whatever its C;
                # only a branch that goes on is held to τ
                if final_answer(text) is not None:
                    node.status = "completed"
                    self.completed.append(node.id)
                    continue
                if node.log_P < _log(self._tau):
                    node.status, node.reason = "pruned", "under_tau"
                    self.counters["branches_pruned"] += 1
                    continue
                if cand.ended:
                    node.status = "dead"  # output ended without a final answer
                    continue
                survivors.append(node)
        self._uncertainty = {}
        survivors.sort(key=lambda n: -n.log_C)  # stable: ties keep proposal order
        for node in survivors[self._keep :]:
            node.status, node.reason = "dropped", "width"
            self.counters["branches_dropped"] += 1
        self.active = [n.id for n in survivors[: self._keep]]
        if self.t >= self.cfg.max_steps:
            for nid in self.active:
                self.nodes[nid].status = "truncated"
            self.active = []
        elif self.cfg.method in ("cat", "bon") and self.cfg.scoring in CUMULATIVE and self.completed and self.active:
            # C never grows under a cumulative scoring (every multiplier is <= 1), so once the best
            # completed branch is at least as confident as every active one, no active branch can win:
            # stop early, answer unchanged.
            best = max(self.nodes[i].log_C for i in self.completed)
            if all(self.nodes[i].log_C <= best for i in self.active):
                for nid in self.active:
                    self.nodes[nid].status, self.nodes[nid].reason = "dropped", "outranked"
                    self.counters["branches_dropped"] += 1
                self.active = []

    def _add(self, parent: Node, cand: ProposedStep, text: str) -> Node:
        sig = StepSignal(tuple(cand.token_entropies), tuple(cand.token_logprobs), final_answer(text) is not None, cand.verdict, text)
        path = [n.signal for n in self.path(parent.id)] + [sig]
        w = self.cfg.window
        log_C = log_path_score(self.cfg.scoring, path, w)
        node = Node(
            id=len(self.nodes),
            parent=parent.id,
            step=text,
            depth=parent.depth + 1,
            log_c=log_path_score(self.cfg.scoring, [sig], w),
            log_C=log_C,
            log_P=log_C if self._prune_scoring == self.cfg.scoring else log_path_score(self._prune_scoring, path, w),
            signal=sig,
            log_C_entropy=parent.log_C_entropy + log_step_multiplier(cand.token_entropies),
            mean_entropy=mean_entropy(cand.token_entropies),
            mean_logprob=(sum(cand.token_logprobs) / len(cand.token_logprobs)) if cand.token_logprobs else 0.0,
            tokens=cand.tokens,
        )
        self.nodes.append(node)
        return node

    def committed(self) -> list[Node]:
        """The steps every possible answer starts with: the longest common prefix of the paths of the
        active and completed branches. The answer is a completed branch, and later branches descend from
        active ones, so this prefix only ever grows, and a streaming server may send it as it grows."""
        live = self.active + self.completed
        if not live:
            return []
        paths = [self.path(nid) for nid in live]
        common: list[Node] = []
        for nodes in zip(*paths):
            if any(n.id != nodes[0].id for n in nodes):
                break
            common.append(nodes[0])
        return common

    # ---- answer ----------------------------------------------------------------------------
    def answer(self) -> tuple[Node | None, list[Node], dict[str, int]]:
        """The chosen completed branch (None: no confident answer), the path reported (the answer's,
        else the deepest branch explored, most confident of equals) and SC's votes."""
        chosen: Node | None = None
        votes: dict[str, int] = {}
        if self.completed:
            done = [self.nodes[i] for i in self.completed]
            if self.cfg.method == "sc":
                counts = Counter(answer_key(final_answer(n.step)) for n in done)
                votes = dict(counts)
                # majority; ties go to the answer whose best chain is most confident, then to the earliest
                best_for = {}
                for n in done:
                    key = answer_key(final_answer(n.step))
                    if key not in best_for or n.log_C > best_for[key].log_C:
                        best_for[key] = n
                order = {key: i for i, key in reversed(list(enumerate(answer_key(final_answer(n.step)) for n in done)))}
                win = max(counts, key=lambda a: (counts[a], best_for[a].log_C, -order[a]))
                chosen = best_for[win]
            elif self.cfg.method == "wsc":
                # confidence-weighted vote: an answer's weight is the sum of its chains' C; ties as sc's
                weight: dict[str, float] = {}
                best_for = {}
                for n in done:
                    key = answer_key(final_answer(n.step))
                    weight[key] = weight.get(key, 0.0) + math.exp(n.log_C)
                    if key not in best_for or n.log_C > best_for[key].log_C:
                        best_for[key] = n
                votes = dict(Counter(answer_key(final_answer(n.step)) for n in done))
                order = {key: i for i, key in reversed(list(enumerate(answer_key(final_answer(n.step)) for n in done)))}
                win = max(weight, key=lambda a: (weight[a], best_for[a].log_C, -order[a]))
                chosen = best_for[win]
            else:
                chosen = max(done, key=lambda n: n.log_C)  # max keeps the first of equals
        if chosen is not None:
            path = self.path(chosen.id)
        else:  # no answer: report the deepest branch explored (most confident of equals) for step metrics
            explored = [n for n in self.nodes[1:] if n.step]
            deepest = max(explored, key=lambda n: (n.depth, n.log_C), default=None)
            path = self.path(deepest.id) if deepest else []
        return chosen, path, votes

    def result(self, with_tree: bool = False) -> SearchResult:
        chosen, path, votes = self.answer()
        return SearchResult(
            question=self.question,
            method=self.cfg.method,
            scoring=self.cfg.scoring,
            answer=final_answer(chosen.step) if chosen else None,
            confidence=math.exp(chosen.log_C) if chosen else 0.0,
            entropy_confidence=math.exp(chosen.log_C_entropy) if chosen else 0.0,
            steps=tuple(n.step for n in path),
            step_mean_entropies=tuple(n.mean_entropy for n in path),
            step_confidences=tuple(math.exp(-n.mean_entropy) for n in path),
            reason="" if chosen else NO_CONFIDENT_ANSWER,
            steps_proposed=self.counters["steps_proposed"],
            tokens_generated=self.counters["tokens_generated"],
            branches_pruned=self.counters["branches_pruned"],
            branches_dropped=self.counters["branches_dropped"],
            branches_completed=len(self.completed),
            branch_points=self.counters["branch_points"],
            votes=votes,
            tree=[n.to_dict() for n in self.nodes[1:]] if with_tree else [],
        )


def _log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


def drive(searches: Sequence[Search]):
    """The search loop without the model: a generator that yields ``(prefixes, n, temperature)``
    batches and is sent the proposals for each. Every pending prefix with equal (n, temperature)
    across all searches goes into one batch. Sync and async drivers share it."""
    while True:
        groups: dict[tuple[int, float], list[Request]] = {}
        for s in searches:
            req = s.pending()
            if req is not None:
                groups.setdefault((req.n, req.temperature), []).append(req)
        if not groups:
            return
        for (n, temperature), reqs in groups.items():
            flat = [p for r in reqs for p in r.prefixes]
            out = yield flat, n, temperature
            if len(out) != len(flat):
                raise RuntimeError(f"proposer returned {len(out)} results for {len(flat)} prefixes")
            i = 0
            for r in reqs:
                r.search.feed(r, out[i : i + len(r.prefixes)])
                i += len(r.prefixes)


def run_searches(searches: Sequence[Search], proposer: StepProposer, with_tree: bool = False) -> list[SearchResult]:
    """Drive searches to completion with a (blocking) proposer."""
    loop = drive(searches)
    try:
        batch = next(loop)
        while True:
            batch = loop.send(proposer.propose(*batch))
    except StopIteration:
        pass
    return [s.result(with_tree=with_tree) for s in searches]


async def run_searches_async(searches: Sequence[Search], proposer, with_tree: bool = False) -> list[SearchResult]:
    """The same with an async proposer (``await proposer.propose(prefixes, n, temperature)``), e.g.
    one that calls the generator service over gRPC."""
    loop = drive(searches)
    try:
        batch = next(loop)
        while True:
            batch = loop.send(await proposer.propose(*batch))
    except StopIteration:
        pass
    return [s.result(with_tree=with_tree) for s in searches]


@dataclass(frozen=True)
class CommittedStep:
    """A step the search has committed to (see ``Search.committed``), as a stream sends it."""

    index: int  # 0-based position in the answer
    text: str
    confidence: float  # this step's c under the search's scoring
    cumulative: float  # C of the path up to and including this step, under the search's scoring
    mean_entropy: float


@dataclass(frozen=True)
class TreeUpdate:
    """The tree's nodes that are new or changed since the last update (``Node.to_dict``; the root, id 0,
    is never sent), as a stream sends them after each step of the search."""

    nodes: tuple[dict, ...]


def _committed_step(index: int, node: Node) -> CommittedStep:
    return CommittedStep(index, node.step, math.exp(node.log_c), math.exp(node.log_C), node.mean_entropy)


async def stream_search(search_: Search, proposer, with_tree: bool = False, tree_events: bool = False):
    """Drive one search with an async proposer, yielding each ``CommittedStep`` as soon as the search
    commits to it and, last, the ``SearchResult``. The steps yielded are the answer's first steps; the
    rest of the answer branch is yielded (as committed steps) just before the result. With
    ``tree_events``, a ``TreeUpdate`` also follows every model call that changed the tree."""
    loop = drive([search_])
    sent = 0
    shown: dict[int, dict] = {}  # tree_events: each node as last sent

    def tree_update() -> TreeUpdate | None:
        if not tree_events:
            return None
        changed = [d for d in (n.to_dict() for n in search_.nodes[1:]) if shown.get(d["id"]) != d]
        shown.update((d["id"], d) for d in changed)
        return TreeUpdate(tuple(changed)) if changed else None

    try:
        batch = next(loop)
        while True:
            proposals = await proposer.propose(*batch)
            try:
                batch = loop.send(proposals)
            finally:  # the last step's update too (the loop ends with StopIteration)
                update = tree_update()
            if update:
                yield update
            for node in search_.committed()[sent:]:
                yield _committed_step(sent, node)
                sent += 1
    except StopIteration:
        if update:
            yield update
    for node in search_.committed()[sent:]:
        yield _committed_step(sent, node)
        sent += 1
    result = search_.result(with_tree=with_tree)
    # the rest of the answer branch (all of it when nothing was committed before, e.g. SC's vote)
    for node in search_.answer()[1][sent:]:
        yield _committed_step(sent, node)
        sent += 1
    yield result


def search(question: str, proposer: StepProposer, config: SearchConfig, with_tree: bool = False) -> SearchResult:
    """Run one search (any method) for one question."""
    return run_searches([Search(question, config)], proposer, with_tree=with_tree)[0]
