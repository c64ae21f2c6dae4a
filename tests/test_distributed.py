"""Outputs do not depend on how many workers made them (issue: sharded extraction, DDP training).

* The work-unit plan is a function of the utterance table alone (:func:`pipeline.sharding.plan_units`).
* ``text.safetensors`` has the same sha256 from the local backend, torchrun with 2 processes and Ray
  with 2 actors (Ray tests skip where ray is not installed).
* Training with 1 and 2 processes (torchrun, gloo), dropout 0, ends with parameters within 1e-5; the
  negative control, a contrastive loss computed per process, does not.
* ``runtime.workers`` is in no stage's params: changing it leaves ``dvc status`` up to date.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train_resume import RAW_PARAMS, write_inputs

from pipeline import sharding
from pipeline.config import parse_params
from pipeline.utterances import Utterance, write_utterances

REPO = Path(__file__).resolve().parents[1]


def env_with(**extra: str) -> dict[str, str]:
    """The stages' environment: torch's default thread count (torchrun and Ray would give workers one
    thread each; the workers must take the driver's, or CPU results differ in their last bits)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update({"PYTHONPATH": str(REPO), "DGLBACKEND": "pytorch", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"})
    return {**env, **extra}


def run_module(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env_with(**env), capture_output=True, text=True)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


# --- the plan ----------------------------------------------------------------------------------------------


def test_plan_units_cover_the_table_in_fixed_aligned_units():
    units = sharding.plan_units(10, 4)
    assert [list(u.rows) for u in units] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [u.index for u in units] == [0, 1, 2]
    # aligned to detection groups of 3: 4 rounds up to 6
    assert [list(u.rows) for u in sharding.plan_units(10, 4, align=3)] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert sharding.plan_units(0, 4) == []
    with pytest.raises(ValueError, match="shard_size"):
        sharding.plan_units(10, 0)
    # a unit with one pending row runs whole; finished units do not run
    assert [u.index for u in sharding.units_to_run(units, {5, 9})] == [1, 2]
    assert sharding.units_to_run(units, set()) == []


class Echo:
    """A picklable unit worker: the ids of its payload, and the process that computed them."""

    def __call__(self, payload):
        return [sharding.UnitResult(uid, None, "missing_clip") for uid in payload], {"pid_" + str(os.getpid()): 1.0}


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_map_units_returns_results_in_plan_order_whatever_the_workers(workers):
    payloads = [[f"u{r}" for r in unit.rows] for unit in sharding.plan_units(23, 5)]
    runtime = parse_params({"runtime": {"backend": "local", "workers": workers}}).runtime
    out = list(sharding.map_units(Echo(), payloads, runtime))
    assert [[r.utterance_id for r in results] for results, _ in out] == payloads


def test_ray_actor_pool_returns_results_in_plan_order():
    ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
    ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Echo: the actors cannot import tests/
    payloads = [[f"u{r}" for r in unit.rows] for unit in sharding.plan_units(23, 5)]
    runtime = parse_params({"runtime": {"backend": "ray", "workers": 2}}).runtime
    out = list(sharding.map_units(Echo(), payloads, runtime))
    assert [[r.utterance_id for r in results] for results, _ in out] == payloads
    pids = {key for _, facts in out for key in facts}
    assert len(pids) == 2 and f"pid_{os.getpid()}" not in pids  # two actors, neither of them this process


# --- the same bytes from every backend ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_stage(tmp_path_factory) -> Path:
    """A folder with a params file (the real MiniLM, units of 16) and an utterance table of 203 utterances."""
    root = tmp_path_factory.mktemp("text_stage")
    words = "I am so happy to see you what did you just say no way that is terrible leave me alone".split()
    utterances = []
    for i in range(203):
        text = "" if i == 7 else " ".join(words[(3 * i) % 11 : (3 * i) % 11 + 2 + i % 6] * (1 + i % 9))
        utterances.append(
            Utterance(f"train/dia{i // 4}_utt{i % 4}", "train", f"train/{i // 4}", i % 4, "AB"[i % 2], text, "", "")
        )
    write_utterances(utterances, root / "utterances.csv")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["text"]["shard_size"] = 16
    raw["text"]["batch_size"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def extract_text_sha(root: Path, name: str, **env: str) -> str:
    out = root / name
    shutil.rmtree(root / "data", ignore_errors=True)  # the resume cache: every backend computes everything
    proc = run_module(
        ["-m", "pipeline.extract_text", "--params", "params.yaml", "--utterances", "utterances.csv"]
        + ["--text-encoder", "none", "--out", str(out)],
        root,
        **env,
    )
    backend = f"backend {env['ERC_RUNTIME_BACKEND']} x {env.get('ERC_RUNTIME_WORKERS', '1')}"
    assert backend in proc.stderr and "resumed_from_cache 0, encoded 202" in proc.stderr, proc.stderr[-2000:]
    return hashlib.sha256((out / "text.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def local_sha(text_stage: Path) -> str:
    return extract_text_sha(text_stage, "local", ERC_RUNTIME_BACKEND="local")


def test_text_features_have_the_same_bytes_under_torchrun(text_stage: Path, local_sha: str):
    sha = extract_text_sha(text_stage, "torchrun", ERC_RUNTIME_BACKEND="torchrun", ERC_RUNTIME_WORKERS="2")
    assert sha == local_sha


def test_text_features_have_the_same_bytes_on_ray_actors(text_stage: Path, local_sha: str):
    pytest.importorskip("ray")
    sha = extract_text_sha(text_stage, "ray", ERC_RUNTIME_BACKEND="ray", ERC_RUNTIME_WORKERS="2")
    assert sha == local_sha


# --- DDP training ---------------------------------------------------------------------------------------------

PER_RANK_CONTRASTIVE = """
import sys
from pipeline import train
from pipeline.losses import GlobalBatch

real = train.DataParallel.global_batch

def per_rank(self, projections, emotion, ce_weights):
    shared = real(self, projections, emotion, ce_weights)
    # the negative control: the contrastive loss over this process's rows only
    return None if shared is None else GlobalBatch(projections, emotion, shared.emotion_weight_sum, shared.utterances)

train.DataParallel.global_batch = per_rank
sys.argv[0] = "pipeline.train"
paths = ("prepared", "features", "graphs", "model", "metrics", "resume-dir")
train.run_stage(train.run, "train", {k: k for k in paths}, distributed="ddp")
"""


@pytest.fixture(scope="module")
def ddp_inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    paths = write_inputs(root / "inputs")
    raw = yaml.safe_load(yaml.safe_dump(RAW_PARAMS))
    raw["model"]["dropout"] = 0.0  # dropout draws differ per process; everything else must agree
    raw["train"]["epochs"] = 4
    raw["train"]["batch_dialogues"] = 3  # 8 dialogues: batches of 3, 3, 2; the processes get 2+1, 2+1, 1+1
    raw["loss"] = {"contrastive_weight": 1.0}  # a contrastive term large enough to matter
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return {"root": root, **paths}


def train_args(ddp: dict, name: str) -> list[str]:
    return ["--params", "params.yaml"] + [
        arg
        for key, value in (
            ("prepared", ddp["prepared"]),
            ("features", ddp["features"]),
            ("graphs", ddp["graphs"]),
            ("model", ddp["root"] / name / "model.pt"),
            ("metrics", ddp["root"] / name / "metrics"),
            ("resume-dir", ddp["root"] / name / "resume"),
        )
        for arg in (f"--{key}", str(value))
    ]


def state(ddp: dict, name: str) -> dict[str, torch.Tensor]:
    return torch.load(ddp["root"] / name / "model.pt", weights_only=True)["state_dict"]


def gradient_carrying(name: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` without the entries that get no true gradient: the key biases of the attention layers.

    A softmax over keys is unchanged by adding the same ``q . b_k`` to every score, so a key bias has a
    zero gradient up to float rounding (about 1e-9 here), and Adam, which divides by the gradient's own
    scale, turns that rounding noise into lr-sized steps: they differ between any two runs whose sums
    are ordered differently, and change no output.
    """
    if name.endswith("key.bias"):
        return value[:0]
    if name.endswith("in_proj_bias"):  # [q | k | v] biases of nn.MultiheadAttention
        h = value.shape[0] // 3
        return torch.cat([value[:h], value[2 * h :]])
    return value


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    differences = [
        (gradient_carrying(k, a[k]).double() - gradient_carrying(k, b[k]).double()).abs().flatten()
        for k in a
        if a[k].is_floating_point()
    ]
    return float(torch.cat(differences).max())


@pytest.fixture(scope="module")
def one_process(ddp_inputs: dict) -> dict:
    run_module(["-m", "pipeline.train", *train_args(ddp_inputs, "one")], ddp_inputs["root"])
    return state(ddp_inputs, "one")


@pytest.mark.slow
def test_training_with_two_processes_matches_one_process(ddp_inputs: dict, one_process: dict):
    proc = run_module(
        ["-m", "pipeline.train", *train_args(ddp_inputs, "two")], ddp_inputs["root"], ERC_RUNTIME_WORKERS="2"
    )
    assert "relaunching under torchrun with 2 processes" in proc.stderr
    assert "process 0 of 2" in proc.stderr
    two = state(ddp_inputs, "two")
    assert max_difference(one_process, two) < 1e-5
    # the same per-epoch train and dev losses, logged by rank 0
    for curve in ("train/loss.tsv", "dev/loss.tsv"):
        one, two_curve = (
            [
                float(line.split()[1])
                for line in (ddp_inputs["root"] / run / "metrics/plots/metrics" / curve).read_text().splitlines()[1:]
            ]
            for run in ("one", "two")
        )
        assert len(one) == 4 and one == pytest.approx(two_curve, rel=1e-6)
    # rank 0 alone wrote the metrics, as one process does
    assert (ddp_inputs["root"] / "two" / "metrics" / "metrics.json").is_file()


@pytest.mark.slow
def test_a_per_process_contrastive_loss_drifts_away(ddp_inputs: dict, one_process: dict):
    script = ddp_inputs["root"] / "per_rank.py"
    script.write_text(PER_RANK_CONTRASTIVE)
    run_module(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
        + train_args(ddp_inputs, "per_rank"),
        ddp_inputs["root"],
        ERC_RUNTIME_WORKERS="2",
    )
    assert max_difference(one_process, state(ddp_inputs, "per_rank")) > 1e-3


# --- runtime is not a stage parameter ----------------------------------------------------------------------


def test_no_stage_lists_runtime_params():
    for dvc_yaml in (REPO / "dvc.yaml", REPO / "regression" / "dvc.yaml"):
        stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
        for name, stage in stages.items():
            listed = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]
            assert not any(p == "runtime" or p.startswith("runtime.") for p in listed), (dvc_yaml, name, listed)


def test_changing_runtime_workers_leaves_dvc_status_as_it_was(tmp_path: Path):
    """In a clone of the project, editing runtime.* in params.yaml changes no stage's status."""
    work = tmp_path / "project"
    subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
    before = run_module(["-m", "dvc", "status", "--json"], work).stdout
    params = work / "params.yaml"
    text = params.read_text()
    edited = text.replace("  workers: 1 ", "  workers: 4 ").replace("  backend: local ", "  backend: ray ")
    assert edited != text and "workers: 4" in edited and "backend: ray" in edited
    params.write_text(edited)
    after = run_module(["-m", "dvc", "status", "--json"], work).stdout
    assert after == before and "runtime" not in after
    # a control: a stage parameter does change the status
    params.write_text(edited.replace("  shard_size: 256 ", "  shard_size: 128 "))
    assert "text" in run_module(["-m", "dvc", "status", "--json"], work).stdout
