"""What a release names: `train.py --version` / `evaluate.py --version` print the version of pyproject.toml and the
git commit (the one MLflow runs record). `make release-check` itself (a clean clone, make smoke, promote, load by
alias) takes ~10 minutes and is run by hand before a release, not here."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import errors
import train
from config import REPO


def expected() -> tuple[str, str]:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return version, commit


def test_train_version_names_the_version_and_the_commit(capsys):
    version, commit = expected()
    for flag in ("--version", "-V"):
        assert errors.main(train.main, [flag]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"wmtp {version} (git {commit}") and line.endswith(")"), line


def test_evaluate_version_from_the_command_line():
    version, commit = expected()
    p = subprocess.run([sys.executable, "evaluate.py", "--version"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.startswith(f"wmtp {version} (git {commit}"), p.stdout


def test_release_check_script_is_valid_bash_and_wired_into_make():
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "release_check.sh")], check=True)
    p = subprocess.run(["make", "-n", "release-check"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "scripts/release_check.sh" in p.stdout
