"""Every benchmark suite end to end on 3 problems (`caspo bench --smoke`); no timing assertions."""

import json
import shutil

import pytest

from caspo.bench.run import SUITES, run_suite

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.mark.parametrize("suite", SUITES)
def test_suite_runs_and_writes_json_markdown_and_plot(suite, out):
    res = run_suite(suite, 3, out, smoke=True, progress=False)
    data = json.loads((out / f"{suite}.json").read_text())
    assert data["suite"] == suite and data["rows"] == json.loads(json.dumps(res.rows))
    assert (out / f"{suite}.md").read_text().startswith(f"### {res.title}")
    assert (out / f"{suite}.png").stat().st_size > 1000
    rows = res.rows
    if suite == "inference":
        assert [(r["method"], r["k"]) for r in rows] == [("greedy", 1), ("sc", 2), ("bon", 2), ("cat", 2), ("cat", 2)]
        assert rows[0]["latency_x_greedy"] == 1.0 and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
        assert all(r["tokens_x_greedy"] >= 1.0 for r in rows[1:])  # K samples cost at least greedy's tokens
    elif suite == "overhead":
        assert [r["measure"] for r in rows][:2] == ["greedy decode, entropy on", "greedy decode, entropy off"]
        assert all(r["seconds"] > 0 for r in rows)
    elif suite == "tau":
        assert [r["how"] for r in rows][:2] == ["fixed", "fixed"] and rows[-1]["how"].startswith("warmup")
        assert 0.0 <= rows[-1]["tau"] <= 1.0 and rows[0]["tokens_x_tau0"] == 1.0
    elif suite == "serve":
        assert [r["clients"] for r in rows] == [1, 2]
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in rows)
        assert data["reload_s"] is not None and data["reload_s"] > 0
    elif suite == "entropy":  # the top-k estimate is an upper bound of the exact entropy, looser for smaller k
        assert [r["k"] for r in rows] == [20, 5] and all(r["tokens"] > 0 for r in rows)
        assert all(r["token_bias_mean"] >= 0 and r["estimate_H"] >= r["exact_H"] for r in rows)
        assert rows[1]["token_bias_mean"] >= rows[0]["token_bias_mean"]
    elif suite == "pareto":
        names = [r["name"] for r in rows]
        assert names == ["greedy", "SC@2", "wSC@2 logprob", "BoN@2 logprob", "CaT@2 Alg.2 entropy τ=0.5", "CaT@2 adaptive (recommended)", "CaT@2 critic (ceiling)"]
        assert rows[0]["diff_vs_greedy"] == 0.0 and rows[0]["tokens_x_greedy"] == 1.0
        assert all(len(r["accuracy_ci"]) == 2 and r["latency_x_greedy"] > 0 for r in rows)
        assert rows[-1]["ceiling_share"] is None and any("critic cost" in n for n in data["notes"])
    elif suite == "publish":
        assert [(r["model"], r["path"]) for r in rows] == [("tiny", "disk"), ("tiny", "transport")]
        assert all(r["seconds"] > 0 and len(r["replica_s"]) == 2 for r in rows)
        disk, wire = rows
        assert abs(wire["MB_moved"] - disk["MB_moved"] * 2 / 3) <= 0.1  # 2 copies over the wire vs a write and 2 reads
    elif suite == "mesh":
        assert rows[0]["replicas"] == 1 and rows[0]["questions_per_min"] > 0
        assert isinstance(rows[0]["pairs"], int) and rows[0]["steps_per_min"] >= rows[0]["questions_per_min"]  # >= 1 step each
        assert data["dpo"] is None or data["dpo"]["samples_per_s"] > 0
