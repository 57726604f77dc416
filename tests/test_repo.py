"""The repository's promises: CI runs README's test command, scripts document themselves, flags are kebab-case."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ["train_pretrain.py", "train_sft.py", "train_gpt.py", "sample.py", "sample_gpt.py"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    test_cmd = next(b for b in blocks if "pytest" in b).strip()
    pytest_part = test_cmd[test_cmd.index("python -m pytest"):]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert pytest_part in [line.strip() for line in ci]
    # and the install steps README tells a newcomer are the ones CI takes
    assert "pip install torch==2.13.0" in test_cmd and any("torch==2.13.0" in line for line in ci)
    assert '-e ".[test]"' in test_cmd and any('-e ".[test]"' in line for line in ci)


@pytest.mark.parametrize("script", [s for s in SCRIPTS if (ROOT / s).exists()])
def test_scripts_have_a_docstring_and_kebab_case_help(script):
    text = (ROOT / script).read_text()
    assert text.startswith('"""') and "python" in text.split('"""')[1], "docstring showing how to run it"
    p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    options = p.stdout[p.stdout.index("options:"):]            # the flag list, not the docstring's examples
    flags = re.findall(r"^\s+(?:-\w, )?--([a-z0-9_-]+)", options, re.M)
    assert flags and not [f for f in flags if "_" in f], "flags are kebab-case"
