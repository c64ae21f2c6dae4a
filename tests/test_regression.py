"""The two CI checks of pipeline.regression on real git histories built in a temporary repository.

The end-to-end tests (test_pipeline_e2e.py) run `reproduce` after a real `dvc repro`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline import regression
from pipeline.regression import compare, lookup

BASE = {
    "test": {
        "emotion": {"weighted_f1": 0.55, "accuracy": 0.58, "macro_f1": 0.30},
        "sentiment": {"weighted_f1": 0.62, "accuracy": 0.63},
    }
}
NOISE = {
    "k": 3,
    "figures": {
        "test.emotion.weighted_f1": {"tolerance": 0.02},
        "test.emotion.accuracy": {"tolerance": 0.02},
        "test.emotion.macro_f1": {"tolerance": 0.05},
        "test.sentiment.weighted_f1": {"tolerance": 0.02},
        "test.sentiment.accuracy": {"tolerance": 0.02},
    },
}


def changed(metrics: dict = BASE, **changes: float) -> dict:
    out = json.loads(json.dumps(metrics))
    for dotted, value in changes.items():
        task, key = dotted.split("__")
        out["test"][task][key] = value
    return out


def test_compare_passes_identical_and_within_tolerance_and_improvements():
    assert compare(BASE, BASE, 0.0) == []
    assert compare(BASE, changed(emotion__weighted_f1=0.535, sentiment__accuracy=0.9), 0.02) == []


def test_compare_names_each_figure_beyond_its_own_tolerance():
    problems = compare(
        BASE,
        changed(emotion__weighted_f1=0.50, emotion__macro_f1=0.27),
        {"test.emotion.weighted_f1": 0.02, "test.emotion.macro_f1": 0.05},
    )
    assert len(problems) == 1 and problems[0].startswith("test.emotion.weighted_f1: 0.5000 < 0.5500 - tolerance 0.020")


def test_compare_fails_a_missing_figure():
    metrics = changed()
    del metrics["test"]["sentiment"]["accuracy"]
    assert compare(BASE, metrics, 0.02) == ["test.sentiment.accuracy: missing from the new metrics (was 0.6300)"]


def test_lookup():
    assert lookup(BASE, "test.emotion.accuracy") == 0.58
    assert lookup(BASE, "test.nothing.accuracy") is None


# --- the checks on a real git history ---------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def commit(repo: Path, files: dict[str, object], message: str) -> str:
    for name, content in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "test")
    monkeypatch.chdir(root)
    monkeypatch.setattr(regression, "dvc_metrics_diff", lambda rev: "")  # no DVC project here
    commit(root, {"README": "x", "regression/noise.json": NOISE}, "start")
    commit(root, {str(regression.GATE_METRICS): BASE}, "first metrics")
    return root


def test_gate_passes_an_unchanged_model_and_a_change_that_leaves_metrics_alone(repo: Path, capsys):
    commit(repo, {"code.py": "print(1)"}, "a code change that does not touch the metrics")
    assert regression.main(["gate"]) == 0  # base: the parent of "first metrics": no earlier file
    commit(repo, {str(regression.GATE_METRICS): changed(emotion__weighted_f1=0.545)}, "within noise")
    assert regression.main(["gate"]) == 0
    assert "no regression" in capsys.readouterr().out


def test_gate_fails_a_committed_drop_and_prints_a_record_to_accept_it(repo: Path, capsys):
    weakened = commit(repo, {str(regression.GATE_METRICS): changed(emotion__weighted_f1=0.48)}, "hidden 8")
    commit(repo, {"notes.txt": "later commit without metrics"}, "later")
    assert regression.main(["gate"]) == 1  # the base is found behind the later commit
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "test.emotion.weighted_f1: 0.4800 < 0.5500" in out
    assert f"commit: {weakened[:7]}" in out
    # an explicit record naming the figure and the commit accepts it, and the gate prints the record
    record = f"- figure: test.emotion.weighted_f1\n  commit: {weakened[:7]}\n  reason: smaller model on purpose\n"
    commit(repo, {str(regression.ACCEPTED): record}, "accept the drop")
    assert regression.main(["gate"]) == 0
    out = capsys.readouterr().out
    assert "ACCEPTED drop" in out and "smaller model on purpose" in out


def test_a_record_for_another_figure_or_commit_does_not_accept(repo: Path):
    commit(repo, {str(regression.GATE_METRICS): changed(emotion__weighted_f1=0.48)}, "drop")
    commit(
        repo,
        {str(regression.ACCEPTED): "- figure: test.emotion.accuracy\n  commit: deadbeef\n  reason: x\n"},
        "wrong record",
    )
    assert regression.main(["gate"]) == 1


def test_gate_with_an_explicit_base(repo: Path):
    first = git(repo, "rev-parse", "HEAD")
    commit(repo, {str(regression.GATE_METRICS): changed(sentiment__weighted_f1=0.50)}, "drop")
    commit(repo, {str(regression.GATE_METRICS): BASE}, "restored")
    assert regression.main(["gate"]) == 0  # default base: the "drop" commit; HEAD is better
    assert regression.main(["gate", "--base", first]) == 0
    assert regression.main(["gate", "--base", "HEAD~1"]) == 0
    assert regression.main(["gate", "--base", "no-such-rev"]) == 1


def test_reproduce_is_exact_on_the_cpu_and_takes_a_tolerance(repo: Path, capsys):
    path = repo / "metrics/eval/metrics.json"
    commit(repo, {"metrics/eval/metrics.json": BASE}, "demo metrics")
    assert regression.main(["reproduce"]) == 0
    path.write_text(json.dumps(changed(emotion__accuracy=0.58 + 1e-6)))
    assert regression.main(["reproduce"]) == 1
    assert "test.emotion.accuracy: committed 0.58" in capsys.readouterr().out
    assert regression.main(["reproduce", "--tolerance", "0.001"]) == 0
    path.write_text(json.dumps({**BASE, "versions": {"torch": "other"}}))
    assert regression.main(["reproduce", "--tolerance", "0.001"]) == 1  # a new field is a difference
