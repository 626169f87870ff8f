"""caspo sweep's settings are checked before anything runs, and its table carries the intervals."""

import pytest

from caspo.trainer.sweep import markdown, parse_setting
from caspo.errors import UsageError


def test_a_setting_splits_into_round_data_and_dpo_fields():
    s = parse_setting('{"name": "DPOP", "pairs": "crew", "questions": 500, "loss_type": "dpop", "learning_rate": 3e-5, "tau_quantile": 0.3}', 0, 200)
    assert (s.name, s.mode, s.questions) == ("DPOP", "crew", 500)
    assert s.dpo_overrides == {"loss_type": "dpop", "learning_rate": 3e-5} and s.pair_overrides == {"tau_quantile": 0.3}
    d = parse_setting("{}", 1, 200)
    assert (d.mode, d.questions, d.cases) == ("step", 200, None)


@pytest.mark.parametrize(
    "raw, message",
    [
        ("[1]", "setting 1 is not a JSON object"),
        ("{oops", "setting 1 is not a JSON object"),
        ('{"lr": 1}', "unknown key(s) lr"),
        ('{"pairs": "best"}', "pairs must be one of step, trajectory, crew"),
        ('{"questions": 0}', "questions must be an integer in 1..100000"),
        ('{"cases": "incorrect"}', "cases must be a list"),
    ],
)
def test_a_bad_setting_is_a_usage_error_naming_the_key(raw, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_setting(raw, 0, 200)


def test_the_table_shows_intervals_and_the_paired_difference():
    row = {"setting": "DPOP", "pairs": {"incorrect": 10}, "accuracy": 0.5, "accuracy_ci": [0.45, 0.55], "ece": 0.2, "ece_ci": [0.18, 0.22],
           "vs_base": {"accuracy": 0.04, "accuracy_ci": [0.01, 0.07], "accuracy_mcnemar_p": 0.012, "ece": -0.05, "ece_ci": [-0.08, -0.02]},
           "drift": {"chosen_logp_change": 0.3, "rejected_logp_change": -1.2, "chosen_fell": 0.25, "weight_change": 0.01, "kl_heldout": 0.002}}
    md = markdown({"command": "caspo sweep x", "eval_n": 1000, "rows": [{"setting": "base (round 0)", "accuracy": 0.46, "accuracy_ci": [0.43, 0.49]}, row]})
    assert "| DPOP | incorrect 10 | 0.500 [0.450, 0.550] | +0.040 [+0.010, +0.070] (0.012) | 0.200 [0.180, 0.220] | -0.050 [-0.080, -0.020] |" in md
    assert "| 0.300 | -1.200 | 0.25 | 0.0100 | 0.0020 |" in md
    assert "0.460 [0.430, 0.490]" in md and "`caspo sweep x`" in md
