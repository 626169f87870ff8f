"""The shipped built-in reasoner itself (caspo/models/tiny_weights), not the suite's test policy
(tests/conftest.py makes ``tiny`` the first model, tests/data/tiny-v1, for everything else): it is
recipe v2's model, chosen on the validation split, and answers the README's own questions right."""

import json

import pytest

from caspo.core.search import SearchConfig
from caspo.evaluation import evaluate
from caspo.models.hf import HFBackend
from caspo.models.tiny import DEFAULT_RECIPE, SHIPPED_DIR, TINY_RECIPES
from caspo.tasks.arith import ArithTask


def test_the_shipped_weights_are_the_default_recipes_validation_choice():
    meta = json.loads((SHIPPED_DIR / "train_meta.json").read_text())
    config = json.loads((SHIPPED_DIR / "config.json").read_text())
    recipe = TINY_RECIPES[DEFAULT_RECIPE]
    assert config["num_hidden_layers"] == recipe["num_layers"] and meta["config"]["steps"] == recipe["steps"]
    assert meta["selected"]["split"] == "val"  # never chosen on the test split or the hand-written file


@pytest.mark.parametrize("method", ["greedy", "cat"])
def test_the_readme_questions_are_answered_right(method):
    task = ArithTask()
    # as README writes them: the third with spaces, as a person types it
    problems = [task.make_problem(q) for q in ("12+7*3-5", "8*(12-5)+3", "(41 + 35) * 2 - 94")]
    report = evaluate(HFBackend(str(SHIPPED_DIR)), task, problems, SearchConfig(method=method, k=4, tau=0.0, seed=0))
    answers = [r.answer for r in report.records]
    assert answers == ["28", "59", "58"], answers
