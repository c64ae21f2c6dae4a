"""End to end: `dvc repro` of the demo in a copy of the repository, then experiments with -S.

Checks: every stage runs; the fresh metrics reproduce the committed ones (the CI reproducibility
check) and no tracked file changes; a second repro does nothing; a failed `dvc exp run` keeps the
git-tracked metrics; `dvc exp run -S train.lr=1e-4` re-runs only train and the stages after it
(evaluate, predict) and really trains at 1e-4; a text.* change re-runs the text branch but
not the audio or visual extraction; and a deliberately broken pipeline (text features shuffled against
their utterances) fails the reproducibility check. The tests share one copy and run in file order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = {
    "check_data",
    "prepare",
    "finetune_text",
    "extract_text",
    "extract_audio",
    "extract_visual",
    "build_graphs",
    "train",
    "evaluate",
    "predict",
}
IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    ".pytest_cache",
    "*.egg-info",
    "prepared",
    "features",
    "graphs",
    "predictions",
    "models",
    "tmp",
    "cache",
    "interim",
)

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # dvc runs stage commands through the shell: `python` must be this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        HF_HUB_OFFLINE="1",
        DGLBACKEND="pytorch",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="t@example.com",
        DVC_NO_ANALYTICS="1",
    )
    return env


def _run(args: list[str], cwd: Path, stdout_only: bool = False) -> str:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{output[-6000:]}"
    return result.stdout if stdout_only else output


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z_]+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git + DVC copy of the repository with `dvc repro` already run once."""
    root = tmp_path_factory.mktemp("e2e") / "repo"
    shutil.copytree(REPO, root, ignore=IGNORE)
    # The reference outputs are the committed ones (the working tree's may have been regenerated): the
    # lock, the metrics and plots, the stage reports, as git holds them at HEAD.
    tracked = subprocess.run(
        ["git", "ls-files", "dvc.lock", "metrics", "data/features"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for path in tracked:
        committed = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, check=True)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(committed.stdout)
    _run(["git", "init", "-q", "-b", "main"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-q", "-m", "copy"], root)
    dvc = [sys.executable, "-m", "dvc"]
    output = _run([*dvc, "repro"], root)
    root.joinpath("first_repro.log").write_text(output)
    return root


def test_repro_runs_every_stage_and_beats_chance(project: Path):
    output = (project / "first_repro.log").read_text()
    assert _stages_run(output) == STAGES
    metrics = json.loads((project / "metrics/eval/metrics.json").read_text())
    emotion = metrics["test"]["emotion"]
    chance = max(emotion["chance"].values())
    assert emotion["weighted_f1"] > chance + 0.3, (emotion["weighted_f1"], chance)
    assert set(emotion["f1"]) == {"neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"}
    assert metrics["encoders_pretrained"] == {"text": True, "audio": False, "visual": False}
    # the demo's defects were reported and masked, not crashed on
    audio = json.loads((project / "data/features/audio_report.json").read_text())
    visual = json.loads((project / "data/features/visual_report.json").read_text())
    assert audio["masked"] == {"missing_clip": ["train/dia2_utt1"], "no_audio": ["train/dia5_utt0"]}
    assert visual["masked"] == {"missing_clip": ["train/dia2_utt1"], "no_face": ["test/dia1_utt2"]}


def test_fresh_repro_reproduces_committed_metrics(project: Path):
    output = _run([sys.executable, "-m", "pipeline.regression", "reproduce"], project)
    assert "reproduced:" in output and "match HEAD exactly" in output


def test_unchanged_pipeline_changes_no_tracked_file(project: Path):
    """A fresh `dvc repro` of the committed pipeline rewrites dvc.lock, the reports, the metrics and the
    plots with the bytes git holds: nothing that changes from run to run (timings, the device, the
    resume cache) is in a tracked file."""
    assert _run(["git", "status", "--porcelain", "--untracked-files=no"], project, stdout_only=True) == ""


def test_second_repro_does_nothing(project: Path):
    output = _run([sys.executable, "-m", "dvc", "repro"], project)
    assert _stages_run(output) == set()
    assert "up to date" in output


def test_failed_exp_run_keeps_the_tracked_metrics(project: Path):
    """DVC deletes a stage's outputs before it runs the stage; the git-tracked ones (metrics, reports) are
    ``persist: true`` in dvc.yaml, so a run that fails (here on invalid params) loses none of them."""
    metrics = sorted(p for p in (project / "metrics").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in metrics}
    args = [sys.executable, "-m", "dvc", "exp", "run", "-S", "train.lr=-1"]
    result = subprocess.run(args, cwd=project, env=_env(), capture_output=True, text=True)
    assert result.returncode != 0 and "train.lr" in result.stdout + result.stderr
    assert {p: p.read_bytes() for p in metrics} == before
    _run(["git", "checkout", "--", "params.yaml"], project)
    _run([sys.executable, "-m", "dvc", "checkout", "models/model.pt"], project)  # deleted before the failed run


def test_exp_run_lr_reruns_only_train_and_the_stages_after_it(project: Path):
    output = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.lr=1e-4"], project)
    assert _stages_run(output) == {"train", "evaluate", "predict"}
    train_metrics = json.loads((project / "metrics/train/metrics.json").read_text())
    # the optimizer's learning rate after warm-up, as logged by the training loop
    assert train_metrics["lr"] == pytest.approx(1e-4, rel=1e-9)
    assert train_metrics["lr_configured"] == pytest.approx(1e-4, rel=1e-9)
    lr_curve = (project / "metrics/train/plots/metrics/lr.tsv").read_text().split()
    assert float(lr_curve[-1]) == pytest.approx(1e-4)


def test_text_params_rerun_text_branch_only(project: Path):
    output = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "text.pooling=cls"], project)
    # finetune_text re-runs too (its input follows text.pooling); off, it rewrites the same note
    assert _stages_run(output) == {"finetune_text", "extract_text", "train", "evaluate", "predict"}


def test_ablation_experiments_show_side_by_side(project: Path):
    for override in ("model.graph=none", "model.fusion=concat"):
        _run(["git", "checkout", "HEAD", "--", "params.yaml"], project)  # each ablation from the defaults
        output = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", override], project)
        stages = _stages_run(output)
        assert {"train", "evaluate", "predict"} <= stages <= {"extract_text", "train", "evaluate", "predict"}
    table = json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], project, stdout_only=True))
    seen = set()
    for commit in table:
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs", []):
                params = revision.get("data", {}).get("params", {}).get("params.yaml", {}).get("data", {})
                metrics = revision.get("data", {}).get("metrics", {}).get("metrics/eval/metrics.json", {}).get("data")
                if metrics:
                    seen.add((params["model"]["graph"], params["model"]["fusion"]))
    assert {("none", "cross_attention"), ("adaptive", "concat")} <= seen, seen


def test_every_switch_trains_on_the_demo_features(project: Path, monkeypatch):
    """Each model / loss switch trains end to end (2 epochs) on the demo's real pipeline outputs."""
    from pipeline.config import parse_params
    from pipeline.data import load_dialogues
    from pipeline.graphs import load_graphs
    from pipeline.train import train
    from pipeline.utterances import load_labels, load_utterances

    monkeypatch.chdir(project)
    switches = [{"model": {"fusion": f}} for f in ("concat", "cross_attention", "joint_vectors")]
    switches += [{"model": {"graph": g}} for g in ("none", "gcn", "adaptive")]
    switches += [{"model": {"context": c}} for c in ("gru", "transformer", "none")]
    switches += [{"loss": {"contrastive": c}} for c in ("none", "supcon", "interclass")]
    switches += [{"loss": {"sentiment_weight": 0.0, "class_weights": "inverse_frequency"}}, {"train": {"patience": 1}}]
    labels = load_labels(project / "data/prepared/labels.json")
    graphs, num_relations = load_graphs(project / "data/graphs")
    splits, encoders = load_dialogues(
        labels["emotions"],
        labels["sentiments"],
        load_utterances(project / "data/prepared/utterances.csv"),
        project / "data/features",
        graphs,
    )
    for switch in switches:
        raw = {**switch, "train": {"epochs": 2, **switch.get("train", {})}}
        result = train(parse_params(raw), splits, num_relations, labels, encoders)
        assert 0.0 <= result["best_dev_weighted_f1"] <= 1.0, switch
        assert result["input_sizes"] == {"text": 384, "audio": 64, "visual": 512}


def test_regression_check_fails_on_a_broken_pipeline(project: Path):
    _run(["git", "checkout", "HEAD", "--", "params.yaml"], project)
    source = project / "pipeline/text_features.py"  # the text features' code (extract_text is the stage's wrapper)
    code = source.read_text()
    anchor = "        table, diagnostics = cache.table(ids, info)\n"
    assert code.count(anchor) == 1
    # The bug: rows no longer belong to their utterances.
    source.write_text(
        code.replace(
            anchor,
            anchor + "        table.features = table.features[torch.randperm("
            "len(table.features), generator=torch.Generator().manual_seed(0))]\n",
        )
    )
    output = _run([sys.executable, "-m", "dvc", "repro"], project)
    # finetune_text re-runs too (it shares text_features.py); off, it rewrites the same note
    assert _stages_run(output) == {"finetune_text", "extract_text", "train", "evaluate", "predict"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.regression", "reproduce"],
        cwd=project,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NOT REPRODUCED" in result.stdout
    assert "metrics/eval/metrics.json: test.emotion.weighted_f1: committed" in result.stdout
    assert "dvc metrics diff HEAD" in result.stdout and "| Path" in result.stdout  # the diff table is shown
