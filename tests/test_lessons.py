"""The lessons in lessons/ are runnable: every ```python block runs, in order, and its asserts hold.

One pytest case per lesson. The blocks of a lesson share one fresh namespace and run top to bottom, with the
repo root on sys.path and a temporary directory as the working directory (so a lesson may write files).
Also checked: every relative link in a lesson points to a file that exists, and lessons/README.md lists
every lesson.
"""

import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ROOT / "lessons"
LESSON_FILES = sorted(p for p in LESSONS.glob("[0-9][0-9]_*.md"))
BLOCK_RE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(text):
    return [m.group(1) for m in BLOCK_RE.finditer(text)]


def test_there_are_lessons():
    assert LESSON_FILES, f"no lessons found in {LESSONS}"


@pytest.mark.parametrize("path", LESSON_FILES, ids=lambda p: p.name)
def test_lesson_runs(path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text())
    assert blocks, f"{path.name} has no ```python blocks"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace = {"__name__": f"lesson_{path.stem}"}
    # The lessons use tiny tensors: one thread is fastest, and far faster on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        for i, src in enumerate(blocks, start=1):
            try:
                code = compile(src, f"{path.name}:block{i}", "exec")
                exec(code, namespace)
            except Exception as e:
                pytest.fail(f"{path.name}, python block {i} failed: {type(e).__name__}: {e}\n--- block {i} ---\n{src}")
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"{path.name} took {elapsed:.1f}s; lessons should run in a few seconds"


@pytest.mark.parametrize("path", sorted(LESSONS.glob("*.md")), ids=lambda p: p.name)
def test_relative_links_exist(path):
    text = BLOCK_RE.sub("", path.read_text())  # links inside code are not links
    broken = []
    for target in LINK_RE.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s):, mailto:, in-page anchors
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{path.name} links to missing files: {broken}"


def test_readme_lists_every_lesson():
    readme = LESSONS / "README.md"
    assert readme.is_file(), "lessons/README.md is missing"
    linked = {t.split("#", 1)[0] for t in LINK_RE.findall(readme.read_text())}
    missing = [p.name for p in LESSON_FILES if p.name not in linked]
    assert not missing, f"lessons/README.md does not link to: {missing}"
