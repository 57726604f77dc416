"""The lessons in lessons/ are runnable: every ```python block runs, in order, and its asserts hold.

One pytest case per lesson. The blocks of a lesson share one fresh namespace and run top to bottom, with the
repo root on sys.path and a temporary directory as the working directory (so a lesson may write files).

Exercises. A lesson's exercise blocks define checkers, `check_NAME(fn)`, which assert that a reader's function
`fn` is right. lessons/solutions/<lesson>.py holds the reference answer `NAME` and a plausible mistake
`wrong_NAME`: the answer must pass its checker and the mistake must fail it, so no checker can pass everything.

Also checked: every relative link (figures included) points to a file that exists, lessons/README.md lists
every lesson and every figure, and lessons/make_figures.py runs and writes exactly the figures checked in.
"""

import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ROOT / "lessons"
FIGURES = LESSONS / "figures"
LESSON_FILES = sorted(p for p in LESSONS.glob("[0-9][0-9]_*.md"))
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TIME_LIMIT_S = 20   # per lesson, single thread, exercises included; most take well under 5 s


def load_module(path):
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_figures = load_module(LESSONS / "make_figures.py")   # python_blocks and run_lesson live there, once


def test_there_are_lessons():
    assert LESSON_FILES, f"no lessons found in {LESSONS}"


@pytest.mark.parametrize("path", LESSON_FILES, ids=lambda p: p.name)
def test_lesson_runs(path, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    # The lessons use tiny tensors: one thread is fastest, and far faster on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        namespace = make_figures.run_lesson(path, tmp_path)
        checks = {k[len("check_"):]: v for k, v in namespace.items() if k.startswith("check_") and callable(v)}
        assert 2 <= len(checks) <= 3, f"{path.name} should have 2-3 exercises (check_* functions), has {sorted(checks)}"
        solutions = load_module(LESSONS / "solutions" / f"{path.stem}.py")
        for name, check in checks.items():
            assert hasattr(solutions, name), f"solutions/{path.stem}.py has no answer {name}() for check_{name}"
            check(getattr(solutions, name))
            with pytest.raises(AssertionError):
                check(getattr(solutions, f"wrong_{name}"))   # a checker must catch a plausible mistake
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT_S, f"{path.name} took {elapsed:.1f}s; lessons should run in a few seconds"


@pytest.mark.parametrize("path", sorted(LESSONS.glob("*.md")), ids=lambda p: p.name)
def test_relative_links_exist(path):
    text = make_figures.BLOCK_RE.sub("", path.read_text())  # links inside code are not links
    broken = []
    for target in LINK_RE.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s):, mailto:, in-page anchors
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{path.name} links to missing files: {broken}"


def test_readme_lists_every_lesson_and_figure():
    readme = LESSONS / "README.md"
    assert readme.is_file(), "lessons/README.md is missing"
    linked = {t.split("#", 1)[0] for t in LINK_RE.findall(readme.read_text())}
    missing = [p.name for p in LESSON_FILES if p.name not in linked]
    assert not missing, f"lessons/README.md does not link to: {missing}"
    figures = [f"figures/{p.name}" for p in sorted(FIGURES.glob("*.png"))]
    unlisted = [f for f in figures if f not in readme.read_text()]
    assert not unlisted, f"lessons/README.md does not name these figures: {unlisted}"


def test_every_figure_is_shown_and_small():
    shown = {t for p in LESSON_FILES for t in LINK_RE.findall(p.read_text()) if t.startswith("figures/")}
    pngs = sorted(FIGURES.glob("*.png"))
    unused = [p.name for p in pngs if f"figures/{p.name}" not in shown]
    assert not unused, f"figures no lesson shows: {unused}"
    total = sum(p.stat().st_size for p in pngs)
    assert total < 1_000_000, f"lessons/figures/ holds {total / 1e6:.2f} MB of PNGs; keep them small"


def test_make_figures_writes_the_checked_in_figures(tmp_path):
    """The figure script runs (so it cannot rot) and makes exactly the figures in lessons/figures/."""
    out = tmp_path / "figures"
    threads = torch.get_num_threads()
    try:
        make_figures.main(["--out-dir", str(out)])   # in this process: one torch import, not two
    finally:
        torch.set_num_threads(threads)
    made = sorted(p.name for p in out.glob("*.png"))
    assert made == sorted(p.name for p in FIGURES.glob("*.png")), "re-run: python lessons/make_figures.py"
    for name in made:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
