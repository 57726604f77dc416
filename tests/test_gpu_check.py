"""benchmarks/gpu_check.py, the script a lent GPU runs, end to end at its reduced shape on the CPU: it cannot rot
between the rare days a GPU is lent."""
import json

import pytest

import gpu_check


@pytest.mark.slow
def test_every_section_runs_and_lands_in_the_json(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    results, failed = gpu_check.main(["--small", "--device", "cpu", "--out", str(out), "--work-dir",
                                      str(tmp_path / "work")])
    assert not failed
    saved = json.loads(out.read_text())
    for name in ("env", "build", "sft", "decode"):
        assert "error" not in saved[name] and "skipped" not in saved[name], (name, saved[name])
    sft = saved["sft"]
    assert sft["tokens_per_s"] > 0 and sft["mfu"] is None   # no peak FLOP/s is known for a CPU
    assert [w["step"] for w in sft["windows"]] == [0, 1, 2] and sft["world_size"] == 1
    assert "--preset qwen2.5-0.5b-siglip" in sft["command"] and "--dtype bf16" in sft["command"]
    for batch in ("batch 1", "batch 8"):
        speeds = saved["decode"][batch]["new_tokens_per_s"]
        assert set(speeds) == {"nanovlm VLM.generate", "nanovlm Qwen2 + KVCache loop", "transformers generate"}
        assert all(v > 0 for v in speeds.values())
    # the attention calls were seen where they happen: the LM and the ViT in training, the LM in decoding
    calls = saved["attention"]["calls"]
    for where in ("sft | LM |", "sft | ViT |", "decode | LM |"):
        assert any(k.startswith(where) for k in calls), (where, calls)
    table = capsys.readouterr().out.split("-" * 100)[-1]
    assert "sft            | tokens/s" in table and "decode batch 8 | transformers generate" in table


def test_a_spent_budget_skips_the_rest_and_says_so(tmp_path, capsys):
    results, failed = gpu_check.main(["--small", "--device", "cpu", "--budget-s", "0", "--out",
                                      str(tmp_path / "r.json")])
    assert not failed
    for name in ("env", "build", "sft", "decode"):
        assert "budget" in results[name]["skipped"]
    assert "skipped" in capsys.readouterr().out


def test_pytest_section_reports_pass_and_failure(tmp_path, monkeypatch):
    (tmp_path / "test_ok.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_ok():\n    pass\n")
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    ctx = {"budget_s": 60, "t_start": gpu_check.time.perf_counter()}
    assert gpu_check.section_pytest(ctx)["result"] == "passed"
    (tmp_path / "test_bad.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_bad():\n    assert 0\n")
    r = gpu_check.section_pytest(ctx)
    assert r["result"] == "FAILED" and "1 failed, 1 passed" in r["last_line"]
