"""The train stage resumes after an interruption: a killed and resumed run writes the same model.pt bytes
and the same DVCLive files as an uninterrupted one (on the CPU); a resume checkpoint of another run is
never used. Also: train.amp on the CPU, the CUDA determinism settings and their warnings."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import train as train_module
from pipeline.config import parse_params
from pipeline.feature_table import FeatureTable, feature_path, save_table
from pipeline.graphs import build_dialogue_graph, load_graphs, save_graphs
from pipeline.utterances import LABELS_FILE, UTTERANCES_FILE, Utterance, write_utterances

REPO = Path(__file__).resolve().parents[1]
EMOTIONS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
SENTIMENTS = ["negative", "neutral", "positive"]
SIZES = {"text": 12, "audio": 6, "visual": 8}
RAW_PARAMS = {
    "model": {"hidden_size": 16, "num_heads": 2, "dropout": 0.1},
    "train": {"epochs": 6, "batch_dialogues": 2, "lr": 3e-3, "warmup_epochs": 1},
}
TRAIN_DIALOGUES, DEV_DIALOGUES = 8, 3
STEPS_PER_EPOCH = math.ceil(TRAIN_DIALOGUES / RAW_PARAMS["train"]["batch_dialogues"])


def params_with(**overrides):
    raw = yaml.safe_load(yaml.safe_dump(RAW_PARAMS))
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    return raw


def write_inputs(root: Path, seed: int = 0) -> dict[str, Path]:
    """Small random upstream outputs (prepared/, features/, graphs/) as the stages write them; the text
    features carry the emotion, so the model learns something and the best epoch moves."""
    params = parse_params(RAW_PARAMS)
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(len(EMOTIONS), SIZES["text"], generator=torch.Generator().manual_seed(99))
    utterances, graphs = [], {}
    for split, count in (("train", TRAIN_DIALOGUES), ("dev", DEV_DIALOGUES)):
        for d in range(count):
            t = int(torch.randint(3, 7, (1,), generator=g))
            speakers = [["A", "B", "C"][int(i)] for i in torch.randint(0, 3, (t,), generator=g)]
            emotions = torch.randint(0, len(EMOTIONS), (t,), generator=g).tolist()
            for u in range(t):
                utterances.append(
                    Utterance(
                        f"{split}/dia{d}_utt{u}",
                        split,
                        f"{split}/{d}",
                        u,
                        speakers[u],
                        "x",
                        EMOTIONS[emotions[u]],
                        SENTIMENTS[emotions[u] // 3],
                    )
                )
            graphs[f"{split}/{d}"] = build_dialogue_graph(speakers, params.graph)
    paths = {"prepared": root / "prepared", "features": root / "features", "graphs": root / "graphs"}
    write_utterances(utterances, paths["prepared"] / UTTERANCES_FILE)
    (paths["prepared"] / LABELS_FILE).write_text(json.dumps({"emotions": EMOTIONS, "sentiments": SENTIMENTS}))
    ids = [u.utterance_id for u in utterances]
    labels = torch.tensor([EMOTIONS.index(u.emotion) for u in utterances])
    for m, size in SIZES.items():
        features = torch.randn(len(ids), size, generator=g)
        if m == "text":
            features = prototypes[labels] + 0.3 * features
        mask = torch.ones(len(ids), dtype=torch.bool) if m == "text" else torch.rand(len(ids), generator=g) > 0.2
        features[~mask] = 0
        save_table(
            FeatureTable(
                ids,
                features,
                mask,
                ["ok" if k else "missing_clip" for k in mask.tolist()],
                {"model": f"random-{m}", "pretrained": False, "params": {"seed": seed}},
            ),
            feature_path(m, paths["features"]),
        )
    save_graphs(graphs, params.graph, paths["graphs"])
    return paths


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine these tiny models train several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.chdir(tmp_path)  # DVCLive looks for a DVC repository from the cwd: not this project's
    monkeypatch.setattr(train_module, "default_device", lambda: torch.device("cpu"))
    return write_inputs(tmp_path / "inputs")


def run_train(inputs: dict[str, Path], out: Path, raw: dict | None = None, on_epoch_end=None) -> None:
    train_module.run(
        parse_params(raw or RAW_PARAMS),
        inputs["prepared"],
        inputs["features"],
        inputs["graphs"],
        out / "model.pt",
        out / "metrics",
        out / "resume",
        on_epoch_end=on_epoch_end,
    )


class Stop(Exception):
    """The simulated interruption."""


def stop_after(epoch: int):
    def hook(e: int) -> None:
        if e == epoch:
            raise Stop(f"killed after epoch {e}")

    return hook


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record the epochs run and the training steps taken (calls of the training loss in pipeline.train)."""
    seen = {"epochs": [], "steps": []}
    real = train_module.batch_loss

    def counted(*args, **kwargs):
        seen["steps"].append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "batch_loss", counted)
    return seen


@pytest.fixture
def reference(inputs: dict[str, Path], tmp_path: Path) -> Path:
    """An uninterrupted run of 6 epochs."""
    out = tmp_path / "uninterrupted"
    run_train(inputs, out)
    assert not (out / "resume").exists()  # deleted at the end
    return out


@pytest.mark.parametrize(("killed_after", "dvc_removed_outputs"), [(3, False), (3, True), (1, False), (5, True)])
def test_killed_and_resumed_run_is_byte_identical(
    inputs, reference, tmp_path, monkeypatch, caplog, killed_after, dvc_removed_outputs
):
    out = tmp_path / "interrupted"
    with pytest.raises(Stop):
        run_train(inputs, out, on_epoch_end=stop_after(killed_after))
    assert (out / "resume" / "last.pt").is_file() and not (out / "model.pt").exists()
    tsv = out / "metrics" / "plots" / "metrics" / "dev" / "weighted_f1.tsv"
    assert len(tsv.read_text().splitlines()) == 1 + killed_after
    if dvc_removed_outputs:  # `dvc repro` deletes a stage's outputs before running it
        for path in (out / "metrics", out / "model.pt"):
            subprocess.run(["rm", "-rf", str(path)], check=True)
    else:  # a kill during the next epoch's logging, after its rows were appended, before last.pt was saved
        for path in (out / "metrics" / "plots" / "metrics").rglob("*.tsv"):
            with open(path, "a") as f:
                f.write(f"{killed_after}\t0.123\n")

    seen = count_calls(monkeypatch)
    caplog.set_level(logging.INFO, logger="pipeline.train")
    run_train(inputs, out, on_epoch_end=seen["epochs"].append)
    assert f"resuming after epoch {killed_after}" in caplog.text
    assert seen["epochs"] == list(range(killed_after + 1, 7))
    assert len(seen["steps"]) == (6 - killed_after) * STEPS_PER_EPOCH  # epochs 1..k were not run again
    assert (out / "model.pt").read_bytes() == (reference / "model.pt").read_bytes()
    assert tree_bytes(out / "metrics") == tree_bytes(reference / "metrics")
    assert len(tsv.read_text().splitlines()) == 1 + 6  # every epoch once
    assert not (out / "resume").exists()


def test_resume_after_the_last_epoch_only_writes_the_outputs(inputs, reference, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    with pytest.raises(Stop):
        run_train(inputs, out, on_epoch_end=stop_after(6))  # killed before model.pt was written
    seen = count_calls(monkeypatch)
    run_train(inputs, out)
    assert seen["steps"] == []
    assert (out / "model.pt").read_bytes() == (reference / "model.pt").read_bytes()
    assert tree_bytes(out / "metrics") == tree_bytes(reference / "metrics")


def test_early_stopping_state_survives_the_resume(inputs, tmp_path, monkeypatch):
    raw = params_with(**{"train.epochs": 30, "train.patience": 2})
    reference = tmp_path / "uninterrupted"
    epochs = []
    run_train(inputs, reference, raw, on_epoch_end=epochs.append)
    assert len(epochs) < 30  # it did stop early
    out = tmp_path / "interrupted"
    with pytest.raises(Stop):
        run_train(inputs, out, raw, on_epoch_end=stop_after(epochs[-1] - 1))  # one epoch before it stops
    resumed = []
    run_train(inputs, out, raw, on_epoch_end=resumed.append)
    assert resumed == [epochs[-1]]
    assert (out / "model.pt").read_bytes() == (reference / "model.pt").read_bytes()
    assert tree_bytes(out / "metrics") == tree_bytes(reference / "metrics")


def logged_lr(out: Path) -> list[float]:
    """The per-epoch lr of a run's DVCLive metrics (``lr.tsv``, last column)."""
    rows = (out / "metrics" / "plots" / "metrics" / "lr.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[-1]) for row in rows]


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_lr_schedule_state_survives_the_resume(inputs, tmp_path, schedule):
    """The scheduler's state (cosine: its step count; plateau: best dev F1 and the epochs without a better
    one) goes through last.pt: a run killed mid-schedule and resumed writes the same bytes."""
    # 14 epochs: this data's dev weighted F1 stops rising after epoch 9 (plateau: halved after epoch 11)
    raw = params_with(**{"train.epochs": 14, "train.lr_schedule": schedule, "train.plateau_patience": 2})
    reference = tmp_path / "uninterrupted"
    run_train(inputs, reference, raw)
    lrs = logged_lr(reference)
    lr = RAW_PARAMS["train"]["lr"]
    if schedule == "cosine":  # warm-up 1 epoch, then down to min_lr_ratio * lr at the last epoch
        assert lrs[0] == pytest.approx(lr) and lrs[-1] == pytest.approx(0.01 * lr)
        assert all(a > b for a, b in zip(lrs, lrs[1:]))
        killed_after = 5
    else:  # kill one epoch before the first halving: one epoch without a better dev F1 counted so far
        halved = next(e for e in range(1, len(lrs)) if lrs[e] < lrs[e - 1])  # epoch `halved` ended it
        assert lrs[halved] == pytest.approx(lrs[halved - 1] / 2)
        killed_after = halved - 1
        assert killed_after >= 1
    out = tmp_path / "interrupted"
    with pytest.raises(Stop):
        run_train(inputs, out, raw, on_epoch_end=stop_after(killed_after))
    run_train(inputs, out, raw)
    assert logged_lr(out) == lrs
    assert (out / "model.pt").read_bytes() == (reference / "model.pt").read_bytes()
    assert tree_bytes(out / "metrics") == tree_bytes(reference / "metrics")


def test_speaker_pair_relations_sized_by_the_data_reach_the_model(inputs, tmp_path):
    """build_graphs sizes speaker_pair relations from the data (here: at most 3 speakers a dialogue: 18, not
    2 * 9**2); train takes the count from the graphs' index and records it for predict."""
    from pipeline.build_graphs import run as build_graphs_stage
    from pipeline.inference import build_model

    raw = params_with(**{"graph.relations": "speaker_pair", "train.epochs": 1})
    params = parse_params(raw)
    assert params.graph.max_speakers == 9
    build_graphs_stage(params, inputs["prepared"] / UTTERANCES_FILE, inputs["graphs"])
    run_train(inputs, tmp_path / "run", raw)
    checkpoint = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert checkpoint["num_relations"] == 18 and checkpoint["relation_speakers"] == 3
    coefficients = [v for k, v in checkpoint["state_dict"].items() if k.endswith("relational.linear_r.coeff")]
    assert [tuple(c.shape) for c in coefficients] == [(18, 4)]
    assert build_model(checkpoint).graph.relational.linear_r.coeff.shape[0] == 18
    summary = json.loads((tmp_path / "run" / "metrics" / "metrics.json").read_text())
    assert summary["num_relations"] == 18
    assert summary["modalities"] == ["text", "audio", "visual"] and summary["fusion"] == "cross_attention"


@pytest.mark.parametrize("change", ["params", "epochs", "labels_data", "features", "corrupt"])
def test_a_resume_checkpoint_of_another_run_is_not_used(inputs, tmp_path, monkeypatch, caplog, change):
    out = tmp_path / "interrupted"
    with pytest.raises(Stop):
        run_train(inputs, out, on_epoch_end=stop_after(3))
    last = out / "resume" / "last.pt"
    assert last.is_file()
    raw = RAW_PARAMS
    if change == "params":
        raw = params_with(**{"train.lr": 1e-3})
    elif change == "epochs":
        raw = params_with(**{"train.epochs": 5})
    elif change in ("labels_data", "features"):
        inputs = write_inputs(tmp_path / "other", seed=1) if change == "labels_data" else inputs
        if change == "features":  # same shapes, one value changed
            from pipeline.feature_table import load_table

            table = load_table(feature_path("audio", inputs["features"]))
            table.features[0, 0] += 1.0
            save_table(table, feature_path("audio", inputs["features"]))
    else:
        last.write_bytes(b"not a checkpoint")
    expected = {
        "params": "(params: ",
        "epochs": "(params: ",
        "labels_data": "(data: ",
        "features": "(data: ",
        "corrupt": "cannot be read",
    }[change]

    seen = count_calls(monkeypatch)
    caplog.set_level(logging.INFO, logger="pipeline.train")
    run_train(inputs, out, raw, on_epoch_end=seen["epochs"].append)
    assert "train: starting fresh" in caplog.text and expected in caplog.text
    assert "resuming after" not in caplog.text
    epochs = parse_params(raw).train.epochs
    assert seen["epochs"] == list(range(1, epochs + 1))
    assert len(seen["steps"]) == epochs * STEPS_PER_EPOCH
    fresh = tmp_path / "fresh"
    run_train(inputs, fresh, raw)
    assert (out / "model.pt").read_bytes() == (fresh / "model.pt").read_bytes()
    assert tree_bytes(out / "metrics") == tree_bytes(fresh / "metrics")


def test_fingerprint_names_what_changed(inputs):
    labels = LABELS
    splits, encoders, relations = load_splits(inputs)
    base = train_module.run_fingerprint(parse_params(RAW_PARAMS), splits, relations, labels, encoders)
    assert base == train_module.run_fingerprint(parse_params(RAW_PARAMS), splits, relations, labels, encoders)
    for raw, part in (
        (params_with(**{"model.dropout": 0.2}), "params"),
        (params_with(**{"loss.temperature": 0.2}), "params"),
        (params_with(**{"train.amp": "bfloat16"}), "params"),
        (params_with(**{"train.lr_schedule": "cosine"}), "params"),
        (params_with(**{"model.modalities": ["text", "audio"]}), "params"),
    ):
        other = train_module.run_fingerprint(parse_params(raw), splits, relations, labels, encoders)
        assert {k for k in base if base[k] != other[k]} == {part}
    # graph.* is not train's: it reaches training through the graphs (data), not as a parameter
    other = train_module.run_fingerprint(
        parse_params(params_with(**{"graph.window_past": 1})), splits, relations, labels, encoders
    )
    assert other == base
    splits["dev"][0].emotion[0] = (splits["dev"][0].emotion[0] + 1) % len(EMOTIONS)
    other = train_module.run_fingerprint(parse_params(RAW_PARAMS), splits, relations, labels, encoders)
    assert {k for k in base if base[k] != other[k]} == {"data"}
    other = train_module.run_fingerprint(
        parse_params(RAW_PARAMS), splits, relations, labels, encoders, device=torch.device("cuda")
    )
    assert "runtime" in {k for k in base if base[k] != other[k]}


def test_train_stage_killed_with_sigkill_resumes(tmp_path: Path):
    """A real `python -m pipeline.train` process, SIGKILLed once its first epoch is saved, then rerun."""
    inputs = write_inputs(tmp_path / "inputs")
    raw = params_with(**{"train.epochs": 8})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DGLBACKEND": "pytorch",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }

    def command(out: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pipeline.train",
            "--params",
            "params.yaml",
            "--prepared",
            str(inputs["prepared"]),
            "--features",
            str(inputs["features"]),
            "--graphs",
            str(inputs["graphs"]),
            "--model",
            f"{out}/model.pt",
            "--metrics",
            f"{out}/metrics",
            "--resume-dir",
            f"{out}/resume",
        ]

    # Slow the first run's epochs a little so that the kill lands mid-run on a fast machine: a
    # sitecustomize on its path delays each save of last.pt (the product code has no test hook for it).
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import time, torch\n_save = torch.save\n"
        "def save(obj, f, *a, **k):\n    _save(obj, f, *a, **k)\n"
        "    if isinstance(obj, dict) and 'since_best' in obj: time.sleep(0.3)\n"
        "torch.save = save\n"
    )
    log_path = tmp_path / "killed.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            command("killed"),
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONPATH": f"{slow}{os.pathsep}{REPO}"},
        )
        try:
            deadline = time.monotonic() + 240
            while not (tmp_path / "killed" / "resume" / "last.pt").exists():
                assert proc.poll() is None, f"the stage ended before its first epoch was saved:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, "no last.pt after 240 s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    assert not (tmp_path / "killed" / "model.pt").exists()

    resumed = subprocess.run(command("killed"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    done = int(resumed.stderr.split("resuming after epoch ")[1].split()[0])
    assert 1 <= done < 8
    assert f"epoch {done + 1:3d}" in resumed.stderr and f"epoch {done:3d} " not in resumed.stderr
    uninterrupted = subprocess.run(command("uninterrupted"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert "starting fresh (no resume checkpoint" in uninterrupted.stderr
    assert (tmp_path / "killed" / "model.pt").read_bytes() == (tmp_path / "uninterrupted" / "model.pt").read_bytes()
    assert tree_bytes(tmp_path / "killed" / "metrics") == tree_bytes(tmp_path / "uninterrupted" / "metrics")
    assert not (tmp_path / "killed" / "resume").exists()


# --- mixed precision and CUDA settings --------------------------------------------------------------


def load_splits(inputs: dict[str, Path]):
    from pipeline.data import load_dialogues
    from pipeline.utterances import load_utterances

    graphs, relations = load_graphs(inputs["graphs"])
    splits, encoders = load_dialogues(
        EMOTIONS, SENTIMENTS, load_utterances(inputs["prepared"] / UTTERANCES_FILE), inputs["features"], graphs
    )
    return splits, encoders, relations


LABELS = {"emotions": EMOTIONS, "sentiments": SENTIMENTS}


def test_amp_is_ignored_on_the_cpu(inputs, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.train")
    splits, _, relations = load_splits(inputs)
    results = {}
    for amp in ("none", "bfloat16", "float16"):
        params = parse_params(params_with(**{"train.epochs": 3, "train.amp": amp}))
        results[amp] = train_module.train(params, splits, relations, LABELS)
    assert "train.amp=bfloat16 ignored on the cpu" in caplog.text
    assert "train.amp=float16 ignored on the cpu" in caplog.text
    for amp in ("bfloat16", "float16"):
        for key, value in results["none"]["state_dict"].items():
            assert torch.equal(value, results[amp]["state_dict"][key]), (amp, key)
        assert results[amp]["best_dev_weighted_f1"] == results["none"]["best_dev_weighted_f1"]


def test_amp_param_is_validated():
    from pipeline.config import ParamsError

    assert parse_params({}).train.amp == "none"
    with pytest.raises(ParamsError, match="train.amp"):
        parse_params({"train": {"amp": "float8"}})


def test_set_seed_for_cuda_sets_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    train_module.set_seed(0, torch.device("cpu"))
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert torch.backends.cudnn.benchmark is False
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    train_module.set_seed(0, torch.device("cuda"))  # seeding CUDA is lazy: works without a GPU
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other deterministic value is kept
    train_module.set_seed(0, "cuda")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    train_module.set_seed(0, "cuda")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_nondeterministic_op_warnings_are_logged_once_each(caplog):
    text = (
        "{} does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True, warn_only=True)'. You can file an issue at ..."
    )
    with warnings.catch_warnings(record=True) as passed:
        warnings.simplefilter("always")
        with train_module.log_nondeterministic_ops() as seen:
            for _ in range(3):
                warnings.warn(text.format("scatter_add_cuda_kernel"), UserWarning, stacklevel=1)
            warnings.warn(text.format("upsample_bilinear2d_backward_out_cuda"), UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert seen == {"scatter_add_cuda_kernel", "upsample_bilinear2d_backward_out_cuda"}
    lines = [r.getMessage() for r in caplog.records if "deterministic" in r.getMessage()]
    assert lines == [
        "op scatter_add_cuda_kernel has no deterministic CUDA kernel: results may differ run to run in the last digits",
        "op upsample_bilinear2d_backward_out_cuda has no deterministic CUDA kernel: results may differ run to run "
        "in the last digits",
    ]
    assert [str(w.message) for w in passed] == ["something else"]  # other warnings still reach the user


# --- on CUDA (skipped without it) ---------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_real_nondeterministic_cuda_op_is_logged(caplog):
    torch.use_deterministic_algorithms(True, warn_only=True)
    with train_module.log_nondeterministic_ops() as seen:
        x = torch.randn(1, 1, 4, 4, device="cuda", requires_grad=True)
        for _ in range(2):
            torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear").sum().backward()
    assert len(seen) == 1 and "no deterministic CUDA kernel" in caplog.text


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("amp", ["none", "bfloat16", "float16"])
def test_cuda_training_resumes_and_repeats(inputs, tmp_path, monkeypatch, amp):
    """On CUDA: two uninterrupted runs agree, and a killed + resumed run agrees with them (same GPU)."""
    monkeypatch.setattr(train_module, "default_device", lambda: torch.device("cuda"))
    raw = params_with(**{"train.amp": amp})
    run_train(inputs, tmp_path / "a", raw)
    run_train(inputs, tmp_path / "b", raw)
    with pytest.raises(Stop):
        run_train(inputs, tmp_path / "c", raw, on_epoch_end=stop_after(3))
    run_train(inputs, tmp_path / "c", raw)
    checkpoints = [torch.load(tmp_path / r / "model.pt", weights_only=True) for r in "abc"]
    for other in checkpoints[1:]:
        assert other["best_epoch"] == checkpoints[0]["best_epoch"]
        for key, value in checkpoints[0]["state_dict"].items():
            assert value.device.type == "cpu"
            torch.testing.assert_close(other["state_dict"][key], value, rtol=1e-4, atol=1e-5)
    assert tree_bytes(tmp_path / "c" / "metrics").keys() == tree_bytes(tmp_path / "a" / "metrics").keys()


def test_contrastive_queue_survives_the_resume(inputs, tmp_path):
    """The queue of earlier projections (loss.contrastive_queue) goes through last.pt with the rest: a run
    killed mid-training and resumed writes the same bytes, and the queue changes what is learnt."""
    raw = params_with(**{"loss.contrastive_queue": 16, "loss.contrastive_weight": 1.0})
    reference = tmp_path / "uninterrupted"
    run_train(inputs, reference, raw)
    out = tmp_path / "interrupted"
    with pytest.raises(Stop):
        run_train(inputs, out, raw, on_epoch_end=stop_after(3))
    run_train(inputs, out, raw)
    assert (out / "model.pt").read_bytes() == (reference / "model.pt").read_bytes()
    without = tmp_path / "no_queue"
    run_train(inputs, without, params_with(**{"loss.contrastive_weight": 1.0}))
    a = torch.load(reference / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(without / "model.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
