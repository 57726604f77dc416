"""Bad runs (issue 18), the run-time side of tests/test_bad_inputs.py: flag values, --init-from and --resume
against what the checkpoint holds, Ctrl-C, a crash inside a checkpoint save and a non-finite loss, the last three
end to end on the tiny preset, where a resumed run must equal an uninterrupted one. Each refusal is one line
naming the flag, file or sample."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_vlm, write
from nanovlm import train_utils as tu
from nanovlm import vlm_train as vt
from nanovlm.cli import run_cli
from nanovlm.data import load_data

ROOT = Path(__file__).resolve().parents[1]


# ---- flags ----------------------------------------------------------------------------------------------------

def sft_args(*argv, stage="sft"):
    return vt.resolve_args(vt.build_parser("", stage).parse_args(["--data-dir", "unused", *argv]))


@pytest.mark.parametrize("argv,match", [
    (["--batch-size", "0"], r"^--batch-size 0: must be at least 1$"),      # was "max() arg is an empty sequence"
    (["--grad-accum", "0"], r"^--grad-accum 0: must be at least 1$"),
    (["--max-steps", "0"], r"^--max-steps 0: must be at least 1$"),        # was: exit 0, no checkpoint, no word
    (["--max-steps", "-5"], r"^--max-steps -5: must be at least 1$"),
    (["--log-every", "0"], r"^--log-every 0: must be at least 1$"),        # was a ZeroDivisionError
    (["--save-every", "0"], r"^--save-every 0: must be at least 1$"),
    (["--lr-lm", "-0.0001"], r"^--lr-lm -0\.0001: must be a finite number >= 0$"),
    (["--lr-vision", "nan"], r"^--lr-vision nan: must be a finite number >= 0$"),
    (["--warmup-steps", "-1"], r"^--warmup-steps -1: must be a finite number >= 0$"),
    (["--min-lr-ratio", "2"], r"^--min-lr-ratio 2\.0: must be between 0 and 1$"),
    (["--grad-clip", "0"], r"^--grad-clip 0\.0: must be > 0"),
    (["--num-workers", "-2"], r"^--num-workers -2: must be >= 0"),
])
def test_bad_flag_values_are_one_line(argv, match):
    with pytest.raises(ValueError, match=match):
        sft_args(*argv)


def test_out_dir_naming_a_file(tmp_path):
    write(tmp_path / "taken", "")
    with pytest.raises(ValueError, match=rf"^--out-dir {tmp_path}/taken: {tmp_path}/taken is a file, not a directory$"):
        sft_args("--out-dir", str(tmp_path / "taken"))
    with pytest.raises(ValueError, match=rf"^--out-dir {tmp_path}/taken/sub: {tmp_path}/taken is a file"):
        sft_args("--out-dir", str(tmp_path / "taken" / "sub"))   # was FileExistsError / NotADirectoryError


@pytest.mark.parametrize("argv,match", [
    (["--temperature", "0"], r"^--temperature 0\.0: must be > 0"),
    (["--top-p", "0"], r"^--top-p 0\.0: must be in \(0, 1\]$"),
    (["--max-new-tokens", "0"], r"^--max-new-tokens 0: must be at least 1$"),
    (["--num-iterations", "0"], r"^--num-iterations 0: must be at least 1$"),
    (["--beta", "-0.1"], r"^--beta -0\.1: must be a finite number >= 0$"),
    (["--reward-funcs", "ocr", "--reward-weights", "inf"], r"^--reward-weights inf: must be a finite number$"),
])
def test_bad_grpo_flag_values(tmp_path, argv, match):
    from train_grpo import parse_args
    tiny_vlm().save_pretrained(tmp_path / "sft")
    with pytest.raises(ValueError, match=match):
        parse_args(["--init-from", str(tmp_path / "sft"), "--data-dir", str(tmp_path), *argv])


def test_scripts_refuse_bad_flags_in_one_line(tmp_path):
    """As a user runs them: exit code 2, one line on stderr, nothing trained or written."""
    commands = {"train_sft.py": (["--batch-size", "0"], "error: --batch-size 0: must be at least 1"),
                "train_pretrain.py": (["--max-steps", "0"], "error: --max-steps 0: must be at least 1")}
    env = {**os.environ, "NANOVLM_DEBUG": "", "PYTHONPATH": str(ROOT)}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / name), "--data-dir", str(tmp_path / "d"),
                                     "--out-dir", str(tmp_path / "out"), *args], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in commands.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2 and err.strip() == commands[name][1], (name, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "d").exists()


# ---- --init-from: the checkpoint decides the model ------------------------------------------------------------

@pytest.mark.parametrize("argv,clash", [
    (["--image-size", "64"], "--image-size 64 (it has 16)"),          # was: silently trained at 16
    (["--patch-size", "4"], "--patch-size 4 (it has 8)"),
    (["--slot-embedding"], "--slot-embedding True (it has False)"),
    (["--image-size", "32", "--patch-size", "16"], "--image-size 32 (it has 16), --patch-size 16 (it has 8)"),
])
def test_init_from_refuses_flags_the_checkpoint_decides(tmp_path, argv, clash):
    tiny_vlm().save_pretrained(tmp_path / "ck")   # 16 x 16 images, 8 x 8 patches, no slot embedding
    with pytest.raises(ValueError, match=re.escape(f"--init-from {tmp_path / 'ck'} decides the model, but {clash}: "
                                                   "drop the flag(s)")):
        sft_args("--init-from", str(tmp_path / "ck"), *argv)


def test_init_from_accepts_what_the_checkpoint_has(tmp_path, capsys):
    tiny_vlm().save_pretrained(tmp_path / "ck")
    sft_args("--init-from", str(tmp_path / "ck"), "--image-size", "16", "--patch-size", "8")   # the same: fine
    args = sft_args("--init-from", str(tmp_path / "ck"))   # the preset's 96 is no request: the checkpoint's 16 holds
    assert args.image_size == 96 and "warning" not in capsys.readouterr().err
    sft_args("--init-from", str(tmp_path / "ck"), "--lm", "Qwen/Qwen2.5-0.5B-Instruct")
    assert capsys.readouterr().err == f"warning: --init-from {tmp_path / 'ck'} holds the model: --lm ignored\n"


def test_init_from_numeric_head_decides_its_shape(tmp_path):
    from nanovlm.numeric import NumericConfig, NumericVLM
    NumericVLM.from_vlm(tiny_vlm(), NumericConfig(60, hidden=24)).save_pretrained(tmp_path / "num")
    with pytest.raises(ValueError, match=r"--numeric-hidden 512 \(it has 24\), --numeric-transform 'identity' "
                                         r"\(it has 'symlog'\)"):
        sft_args("--init-from", str(tmp_path / "num"), "--numeric-hidden", "512", "--numeric-transform", "identity")
    tiny_vlm().save_pretrained(tmp_path / "plain")   # no head: the flags shape the new one
    assert sft_args("--init-from", str(tmp_path / "plain"), "--numeric", "--numeric-hidden", "8").numeric_hidden == 8


# ---- --resume: the run's own flags ----------------------------------------------------------------------------

def saved_run(tmp_path, tok, *argv, step=2):
    """A checkpoint at `step` in tmp_path/run written as the training scripts write it, by a run with these flags."""
    args = sft_args("--out-dir", str(tmp_path / "run"), "--max-steps", "4", *argv)
    model = tiny_vlm()
    opt = tu.make_optimizer([("all", model.parameters(), 1e-3)])
    vt.save_vlm_checkpoint(tmp_path / "run", model, tok, opt, step, args, tu.Dist())
    return model, opt


def test_resume_refuses_flags_that_change_the_run(tmp_path, tok):
    saved_run(tmp_path, tok)
    out = ["--out-dir", str(tmp_path / "run"), "--max-steps", "4", "--resume"]
    with pytest.raises(ValueError, match=r"^--resume: --batch-size 32 -> 4, --optimizer 'muon' -> 'adamw' differ from "
                                         rf"the run in {tmp_path}/run \(args\.json\); only --max-steps, --log-every, "
                                         r".*may change on resume"):
        vt.check_resume(sft_args(*out, "--batch-size", "4", "--optimizer", "adamw"), tu.Dist())
    for argv in (["--lora-rank", "4"], ["--numeric"], ["--seed", "1"], ["--dtype", "bf16"]):
        with pytest.raises(ValueError, match=rf"^--resume: {argv[0]} "):
            vt.check_resume(sft_args(*out, *argv), tu.Dist())
    with pytest.raises(ValueError, match=r"^--resume: the number of processes 1 -> 2 differ"):   # the global batch
        vt.check_resume(sft_args(*out), tu.Dist(world_size=2))
    with pytest.raises(ValueError, match=r"^--resume: the stage 'sft' -> 'pretrain' differ|^--resume: .*--stage"):
        vt.check_resume(sft_args(*out, stage="pretrain"), tu.Dist())


def test_grpo_resume_refuses_flags_that_change_the_run(tmp_path, tok):
    from train_grpo import parse_args
    model = tiny_vlm()
    model.save_pretrained(tmp_path / "sft")
    common = ["--init-from", str(tmp_path / "sft"), "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "grpo")]
    opt = tu.make_optimizer([("all", model.parameters(), 1e-3)])
    vt.save_vlm_checkpoint(tmp_path / "grpo", model, tok, opt, 5, parse_args(common), tu.Dist())
    with pytest.raises(ValueError, match=r"^--resume: --num-generations 8 -> 4, --beta 0\.0 -> 0\.04 differ"):
        vt.check_resume(parse_args(common + ["--num-generations", "4", "--beta", "0.04", "--resume"]), tu.Dist())
    vt.check_resume(parse_args(common + ["--eval-answers", "20", "--resume"]), tu.Dist())


def test_resume_may_change_when_to_stop_and_keeps_the_runs_args_json(tmp_path, tok, capsys):
    model, opt = saved_run(tmp_path, tok)
    first = (tmp_path / "run" / "args.json").read_text()
    args = sft_args("--out-dir", f"{tmp_path}/./run", "--max-steps", "8", "--log-every", "1", "--resume")
    vt.check_resume(args, tu.Dist())
    assert capsys.readouterr().out == ("--resume from step 2: --max-steps 4 -> 8, --log-every 10 -> 1 (the "
                                       "learning-rate schedule now ends at the new --max-steps)\n")
    assert json.loads((tmp_path / "run" / "resumes.jsonl").read_text()) == {
        "step": 2, "changed": {"max_steps": [4, 8], "log_every": [10, 1]}}
    vt.save_vlm_checkpoint(tmp_path / "run", model, tok, opt, 3, args, tu.Dist())   # the resumed run saves
    assert (tmp_path / "run" / "args.json").read_text() == first   # still the flags that started the run
    assert (tmp_path / "run" / "resumes.jsonl").exists()           # carried across the checkpoint swap


def test_resume_forgets_the_rows_a_lost_run_logged_after_the_checkpoint(tmp_path, tok):
    """A run killed between saves had logged rows for steps the resumed run does again (and maybe half a row);
    they would appear twice. The checkpoint records how many rows it had."""
    (tmp_path / "run").mkdir()
    rows = [{"step": 0, "loss": 3.0}, {"step": 1, "loss": 2.5}]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    saved_run(tmp_path, tok)   # at step 2, with those two rows
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "loss": 2.4}) + '\n{"step": 3, "lo')   # the lost run's, the last cut short
    vt.check_resume(sft_args("--out-dir", str(tmp_path / "run"), "--max-steps", "4", "--resume"), tu.Dist())
    assert [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == rows


def test_resume_at_or_past_max_steps(tmp_path, tok, capsys):
    saved_run(tmp_path, tok, step=4)
    out = ["--out-dir", str(tmp_path / "run"), "--resume"]
    with pytest.raises(ValueError, match=rf"^--resume: the checkpoint in {tmp_path}/run is at step 4, past "
                                         r"--max-steps 3$"):
        vt.check_resume(sft_args(*out, "--max-steps", "3"), tu.Dist())
    vt.check_resume(sft_args(*out, "--max-steps", "4"), tu.Dist())
    assert f"the checkpoint in {tmp_path}/run is already at --max-steps 4: nothing to train" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint at {tmp_path}/none"):
        vt.check_resume(sft_args("--out-dir", str(tmp_path / "none"), "--resume"), tu.Dist())


@pytest.mark.parametrize("change", ["fewer parameters", "more groups"])
def test_optimizer_state_that_does_not_fit_names_the_checkpoint(tmp_path, change):
    """--resume after changing --optimizer, --lora-rank or --numeric was PyTorch's parameter-group error."""
    model = tiny_vlm()
    opt = tu.make_optimizer([("all", model.parameters(), 1e-3)])
    tu.save_checkpoint(tmp_path / "ck", model, model.cfg.to_dict(), optimizer=opt, step=1)
    model2 = tiny_vlm()
    groups = ([("lm", model2.lm.parameters(), 1e-3)] if change == "fewer parameters" else
              [("lm", model2.lm.parameters(), 1e-3), ("rest", [*model2.vision.parameters(),
                                                               *model2.projector.parameters()], 1e-3)])
    with pytest.raises(ValueError, match=rf"^{tmp_path}/ck/train_state\.pt: its optimizer state does not fit this "
                                         rf"run's optimizer \(.*\): resume with the flags that started the run "
                                         rf"\({tmp_path}/ck/args\.json\)$"):
        tu.load_checkpoint(tmp_path / "ck", model2, tu.make_optimizer(groups))


# ---- Ctrl-C, a crash inside a save, a non-finite loss: the pieces ---------------------------------------------

def test_first_ctrl_c_is_a_flag_the_second_aborts(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)
    stop = tu.StopOnCtrlC(tu.Dist(), tmp_path)
    try:
        assert not stop.requested()
        signal.raise_signal(signal.SIGINT)   # handled between bytecodes: no KeyboardInterrupt
        assert stop.requested()
        assert "Ctrl-C: stopping at the end of this step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt, match="aborted by a second Ctrl-C; no checkpoint was saved"):
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_run_cli_prints_ctrl_c_as_one_line(monkeypatch, capsys):
    monkeypatch.delenv("NANOVLM_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    def main():
        raise tu.Interrupted(7, "out/sft")
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 130
    assert capsys.readouterr().err == ("\ninterrupted: stopped after step 7, checkpoint saved in out/sft: add --resume "
                                       "to continue\n")


def test_crash_between_the_renames_of_a_save_loses_nothing(tmp_path, monkeypatch):
    """The crash leaves no run directory, the old checkpoint as .run.old and the new, complete one as .run.tmp;
    metrics.jsonl lived in the run directory, so a resume that read .run.old lost the history (nothing to append
    to). Recovery renames the new one back into place, metrics.jsonl with it."""
    path, model = tmp_path / "run", tiny_vlm()
    opt = tu.make_optimizer([("all", model.parameters(), 1e-3)])
    log = tu.MetricsLogger(path)
    for step in range(4):
        log.log(step, loss=4.0 - step)
        if step == 1:
            tu.save_checkpoint(path, model, model.cfg.to_dict(), optimizer=opt, step=2)
    real_rename = os.rename
    def rename(src, dst):
        if str(src).endswith(".run.tmp"):
            raise SystemExit("the process dies here")
        real_rename(src, dst)
    monkeypatch.setattr(tu.os, "rename", rename)
    with pytest.raises(SystemExit):
        tu.save_checkpoint(path, model, model.cfg.to_dict(), optimizer=opt, step=4)
    monkeypatch.undo()
    assert not path.exists() and (tmp_path / ".run.old").is_dir() and (tmp_path / ".run.tmp").is_dir()

    assert tu.checkpoint_dir(path) == tmp_path / ".run.tmp"   # what a read (--init-from, sample.py) takes
    tu.recover_checkpoint(path)                                # what --resume does first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.old", "run"]
    assert tu.load_checkpoint(path, tiny_vlm(), tu.make_optimizer([("all", tiny_vlm().parameters(), 1e-3)]))[
        "step"] == 4
    tu.MetricsLogger(path, resume_step=4)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]


def test_non_finite_loss_names_the_samples_of_its_step():
    losses = [torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(float("inf"))]
    samples = [["a.jsonl:1", "a.jsonl:2"], ["b.jsonl:7", "a.jsonl:3"], ["a.jsonl:9"]]
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 11 \(samples: b\.jsonl:7, a\.jsonl:3\): "
                                                 r"check those samples"):
        tu.check_losses(losses, 12, tu.Dist(), samples)   # steps 10, 11, 12: the first non-finite one is named
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 11: check those samples"):
        tu.check_losses(losses, 12, tu.Dist())
    assert tu.check_losses(losses[:1], 3, tu.Dist(), samples[:1]) == 2.0


# ---- end to end: a tiny run interrupted, crashed, poisoned ----------------------------------------------------

STEPS = 12


def launch(args, patch=None):
    """Start a script as a user would (python train_sft.py ...), optionally with `patch` (Python source) run first
    in the same process, to make it crash where a test wants."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NANOVLM_DEBUG": ""}
    env.pop("RANK", None)
    cmd = [sys.executable, str(ROOT / args[0]), *args[1:]]
    if patch:
        cmd = [sys.executable, "-c", patch + "\nimport runpy, sys\nsys.argv = sys.argv[1:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')", str(ROOT / args[0]), *args[1:]]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, code=0):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, f"exit {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
    return out, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The flags of a tiny SFT run (a loss row every step) and the weights of that run left uninterrupted."""
    root = tmp_path_factory.mktemp("runs")
    flags = ["train_sft.py", "--data-dir", str(root / "data"), "--n-synthetic", "40", "--batch-size", "2",
             "--eval-every", "1000", "--save-every", "1000", "--warmup-steps", "1", "--device", "cpu",
             "--eval-answers", "0", "--log-every", "1", "--max-steps", str(STEPS)]
    finish(launch(flags + ["--out-dir", str(root / "straight")]))
    return flags, load_file(root / "straight" / "model.safetensors")


def loss_steps(run):
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_ctrl_c_saves_at_the_end_of_the_step_and_resume_is_exact(tmp_path, tiny_run):
    flags, straight = tiny_run
    run = tmp_path / "run"
    proc = launch(flags + ["--out-dir", str(run)])
    deadline = time.time() + 300
    # two steps logged (whole lines, one per step): the loop is running
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)   # what Ctrl-C in the terminal sends
    out, err = finish(proc, 130)
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in err, err
    step = int(re.fullmatch(rf"interrupted: stopped after step (\d+), checkpoint saved in {run}: add --resume to "
                            "continue", lines[0])[1])
    assert 2 <= step < STEPS
    assert torch.load(run / "train_state.pt", weights_only=False)["step"] == step
    assert loss_steps(run) == list(range(step))   # every step before the interrupt logged

    finish(launch(flags + ["--out-dir", str(run), "--resume"]))
    resumed = load_file(run / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)   # bit for bit
    assert loss_steps(run) == list(range(STEPS))


KILLED_AFTER_ROW_6 = """
import os
from nanovlm import train_utils as tu
log = tu.MetricsLogger.log
def log_then_die(self, step, **metrics):   # die (as kill -9 would) between two saves, rows logged after the first
    log(self, step, **metrics)
    if step == 6:
        os._exit(9)
tu.MetricsLogger.log = log_then_die
"""
CRASH_BETWEEN_RENAMES = """
import os
from pathlib import Path
real_rename = os.rename
def rename(src, dst):   # die between a save's two renames, once there is a checkpoint to swap
    if str(src).endswith('.tmp') and (Path(dst).parent / f'.{Path(dst).name}.old').exists():
        os._exit(9)
    real_rename(src, dst)
os.rename = rename
"""


@pytest.mark.slow
def test_crashes_lose_nothing_but_the_steps_since_the_last_save(tmp_path, tiny_run):
    """Killed between two saves, then inside a save (between its two renames): each --resume goes on from the
    last checkpoint saved, and the run ends with the weights and the metrics.jsonl of an uninterrupted run."""
    flags, straight = tiny_run
    run, every4 = tmp_path / "run", ["--out-dir", str(tmp_path / "run"), "--save-every", "4"]
    finish(launch(flags + every4, patch=KILLED_AFTER_ROW_6), 9)   # checkpoint at step 4, rows of steps 0..6
    assert torch.load(run / "train_state.pt", weights_only=False)["step"] == 4 and loss_steps(run)[-1] == 6

    finish(launch(flags + every4 + ["--resume"], patch=CRASH_BETWEEN_RENAMES), 9)   # inside step 8's save
    assert not run.exists() and (tmp_path / ".run.old").is_dir() and (tmp_path / ".run.tmp").is_dir()

    out, err = finish(launch(flags + every4 + ["--resume"]))
    assert f"{run}: recovered the checkpoint an interrupted save left in .run.tmp" in out
    resumed = load_file(run / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert loss_steps(run) == list(range(STEPS))   # each step's row once: none lost, none twice


NAN_AT_STEP_2 = """
import nanovlm.vlm as v
forward, calls = v.VLM.forward, []
def poisoned(self, *a, **k):   # the third training forward (step 2, one micro-batch per step) returns a NaN loss
    out = forward(self, *a, **k)
    if self.training:
        calls.append(1)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("nan")
    return out
v.VLM.forward = poisoned
"""


@pytest.mark.slow
def test_nan_loss_in_training_names_the_samples(tmp_path, tiny_run):
    flags, _ = tiny_run
    args = flags + ["--out-dir", str(tmp_path / "run")]
    out, err = finish(launch(args, patch=NAN_AT_STEP_2), 2)
    # the samples step 2 reads, from the data order's definition (train_utils.batch_indices) and the data files
    a = sft_args(*[x for x in args[1:] if x != "--eval-answers" and x != "0"])
    samples = load_data(a.data, a.image_root, seed=a.seed)
    want = {samples[i]["where"] for i in tu.batch_indices(2, 0, 0, 1, 2, 1, len(samples), a.seed)}
    m = re.fullmatch(r"error: loss is nan at step 2 \(samples: (.*)\): check those samples, lower --lr, or try "
                     r"--dtype fp32", err.strip().splitlines()[-1])
    assert m and set(m[1].split(", ")) == want, err
