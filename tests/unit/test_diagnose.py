"""caspo diagnose's driver on a scripted proposer whose sibling sets are known: it must find the ties."""

from caspo.core.contract import ProposedStep
from caspo.diagnose import diagnose
from caspo.tasks.arith import ArithTask, state_after, reference_step

TASK = ArithTask()
PROBLEMS = [TASK.make_problem(q) for q in ("12+7*3-5", "8*(12-5)+3", "50-8-2")]


def slip(step: str) -> str:
    """The step with the last digit of its result changed (a late, one-character divergence)."""
    head, _, rest = step.partition(";")
    d = head[-1]
    head = head[:-1] + ("0" if d != "0" else "1")
    return head + (";" + rest if rest else "")


class Scripted:
    """After every prefix: the right step and a wrong one that diverges only in its last result digit,
    each with the SAME token entropies (the context before the divergence is shared), the wrong one with a
    lower log-prob at its last digit. Greedy (temperature 0) takes the right step, except on the first
    problem, where its final answer is the wrong one."""

    def propose(self, prefixes, n, temperature):
        out = []
        for p in prefixes:
            right = reference_step(state_after(p.question, p.steps))
            ents = tuple(0.1 for _ in right)
            good = ProposedStep(right, ents, tuple(-0.05 for _ in right))
            if right.startswith("####"):
                wrong = ProposedStep(right + "1", ents + (0.1,), tuple(-0.05 for _ in right) + (-2.0,))
            else:
                wrong = ProposedStep(slip(right), ents, tuple(-0.05 for _ in right[:-1]) + (-2.0,))
            if temperature == 0:
                last_of_first = p.question == "12+7*3-5" and right.startswith("####")
                out.append([wrong if last_of_first else good])
            else:
                out.append(([good, wrong] * n)[:n])
        return out


def test_diagnose_finds_the_ties_of_entropy_and_the_ranking_of_log_prob():
    rep = diagnose(Scripted(), TASK, PROBLEMS, k=4, temperature=0.7, seed=0, scorings=("entropy", "logprob", "product"))
    prefixes = sum(len(p.gold_steps) for p in PROBLEMS)
    assert rep["sets"] == prefixes and rep["mixed_sets"] == prefixes
    assert rep["siblings"] == 4 * prefixes and rep["distinct_siblings"] == 2 * prefixes
    # entropy cannot tell the siblings apart (except the '####' ones, where the wrong one is a token longer
    # at the same entropy, so it ties too): every mixed set ties, and the pick is a coin flip
    assert rep["ties"]["entropy"] == prefixes and rep["all_tied"]["entropy"] == prefixes
    assert rep["sibling_ranking"]["entropy"] == 0.5
    # log-prob sees the last digit: never a tie, always right
    assert rep["ties"]["logprob"] == 0 and rep["sibling_ranking"]["logprob"] == 1.0
    assert rep["chance"] == 0.5
    # the wrong operation steps differ from the right ones in one character, at the end of the step
    div = rep["divergence"]
    assert div["wrong_siblings"] == prefixes and div["one_character"] == prefixes - len(PROBLEMS)
    assert div["median_relative_position"] > 0.5
    assert rep["errors"] == {"arithmetic slip": prefixes - len(PROBLEMS), "wrong final answer": len(PROBLEMS)}
    assert rep["error_kinds"] == {"arithmetic": prefixes}
    # greedy: the first problem ends with a wrong answer, the other two are right
    g = rep["greedy"]
    assert g["n"] == 3 and g["accuracy"] == 2 / 3 and g["first_errors"] == {"wrong final answer": 1}
    assert g["accuracy_ci"][0] < 2 / 3 < g["accuracy_ci"][1]
