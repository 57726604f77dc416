"""The benchmarks run end to end (tiny budgets) and their scoring is right on hand-worked numbers."""
import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import numeric_vs_digits  # noqa: E402


def test_score_by_hand():
    samples = [{"messages": [{"role": "assistant", "content": "<num><10>"}], "where": "a", "qtype": "chart_value"},
               {"messages": [{"role": "assistant", "content": "<num><200>"}], "where": "b", "qtype": "chart_total"},
               {"messages": [{"role": "assistant", "content": "<num><4>"}], "where": "c", "qtype": "chart_value"}]
    r = numeric_vs_digits.score(samples, [10.4, 150.0, None])
    # errors: |10.4 - 10| = 0.4 (4%, within 5%), |150 - 200| = 50 (25%), no answer for the third
    assert r["all"]["n"] == 3 and r["all"]["answered"] == pytest.approx(2 / 3)
    assert r["all"]["mae"] == pytest.approx(25.2) and r["all"]["acc_5pct"] == pytest.approx(1 / 3)
    assert r["chart_value"]["mae"] == pytest.approx(0.4) and r["chart_value"]["acc_5pct"] == pytest.approx(0.5)


@pytest.mark.slow
def test_numeric_vs_digits_runs(tmp_path):
    out = tmp_path / "out"
    numeric_vs_digits.main(["--out-dir", str(out), "--data-dir", str(tmp_path / "data"), "--n-synthetic", "60",
                            "--max-steps", "2", "--batch-size", "4", "--eval-charts", "6", "--device", "cpu"])
    results = json.loads((out / "results.json").read_text())
    for run in ("numeric", "digits", "blind"):
        assert results[run]["report"]["all"]["n"] == 6
    # the blind guess answers every question with a training median: always a number
    assert results["blind"]["report"]["all"]["answered"] == 1.0


def test_bench_packing_runs_and_checks_it_computes_the_same(tmp_path, monkeypatch):
    """End to end at a tiny budget; the benchmark itself refuses to time two sides that compute different
    gradients -- shown by breaking packing's attention mask (samples sharing a row then see each other)."""
    import bench_packing
    from nanovlm import data
    from nanovlm.attention import Packing
    argv = ["--data-dir", str(tmp_path / "data"), "--n-synthetic", "40", "--batches", "1", "--batch-size", "8",
            "--threads", "1"]
    assert bench_packing.main(argv) > 0
    fill = data._fill_rows
    def leaky(batch, rows, pad_id):   # every sample of a row numbered 1: one long sample, no block-diagonal mask
        out = fill(batch, rows, pad_id)
        out["attention_mask"] = (out["attention_mask"] > 0).long()
        out["packing"] = Packing.from_mask(out["attention_mask"])
        return out
    monkeypatch.setattr(data, "_fill_rows", leaky)
    with pytest.raises(SystemExit, match="not comparable"):
        bench_packing.main(argv)


def test_bench_rollout_runs_and_checks_the_sides_agree():
    """At a tiny budget: the baseline of commit e8488d6 (from git history; skipped in a clone without it) and
    transformers decode the same greedy tokens as ours before anything is timed, and every ratio comes out."""
    import subprocess
    import bench_rollout
    has_history = subprocess.run(["git", "cat-file", "-e", f"{bench_rollout.BASELINE}^{{commit}}"],
                                 cwd=bench_rollout.Path(bench_rollout.__file__).parents[1]).returncode == 0
    rows = bench_rollout.main(["--prompts", "2", "--samples", "2", "--new-tokens", "3", "--repeats", "1",
                               "--warmup", "0", "--threads", "1"] + ([] if has_history else ["--skip", "e8488d6"]))
    labels = [r[0] for r in rows]
    assert "lm-only: ours vs transformers" in labels
    assert ("rollout: ours vs e8488d6" in labels) == has_history
    assert all(r[3] > 0 and r[4] > 0 for r in rows)
