"""dvc.yaml against the stage modules: each stage lists the code it runs (the extraction stages' resume caches
are keyed on exactly that list), its command passes every path its ``run()`` takes, and the command-line
harness (:func:`pipeline.cli.run_stage`); the resume cache's key (settings, code, weights)."""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import run_stage
from pipeline.extraction_cache import PACKAGE_DIR, ExtractionCache, code_fingerprint, stage_code_files
from pipeline.reports import ModalityLostError

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
EXTRACTION_STAGES = [s for s in STAGES if s.startswith("extract_")]

# The pipeline modules loaded by importing one module in a fresh interpreter, as paths relative to the repository.
CLOSURE_SCRIPT = """
import importlib, json, sys
from pathlib import Path
importlib.import_module(sys.argv[1])
root = Path.cwd().resolve()
print(json.dumps(sorted(Path(m.__file__).resolve().relative_to(root).as_posix() for name, m in sys.modules.items()
                        if (name == "pipeline" or name.startswith("pipeline.")) and getattr(m, "__file__", None))))
"""


def listed_code(stage: str) -> set[str]:
    """The ``pipeline/*.py`` deps dvc.yaml gives ``stage``."""
    return {d for d in STAGES[stage]["deps"] if isinstance(d, str) and d.startswith("pipeline/") and d.endswith(".py")}


def static_closure(module: str) -> set[str]:
    """``pipeline/<name>.py`` of every pipeline module ``module`` imports, transitively, read from the source:
    imports inside functions (loaded only when the function runs) count too."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((PACKAGE_DIR / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")]
            elif isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                todo.append(node.module.split(".")[1])
    return {f"pipeline/{name}.py" for name in seen}


@pytest.fixture(scope="module")
def import_closure() -> dict[str, set[str]]:
    """Stage -> the pipeline files that ``import pipeline.<stage>`` loads in a fresh interpreter (all stages in
    parallel), without the package's ``__init__.py`` (see :func:`test_package_init_holds_no_code`)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DGLBACKEND": "pytorch",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    procs = {
        stage: subprocess.Popen(
            [sys.executable, "-c", CLOSURE_SCRIPT, f"pipeline.{stage}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stage in STAGES
    }
    out = {}
    for stage, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"import pipeline.{stage} failed:\n{stderr[-3000:]}"
        files = set(json.loads(stdout))
        assert f"pipeline/{stage}.py" in files
        out[stage] = files - {"pipeline/__init__.py"}
    return out


def test_every_stage_is_a_module():
    assert set(STAGES) == {
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
    for stage in STAGES:
        assert (PACKAGE_DIR / f"{stage}.py").is_file(), stage


def test_package_init_holds_no_code():
    """Every stage imports ``pipeline/__init__.py`` but dvc.yaml lists no stage's copy of it: fine while empty."""
    assert (PACKAGE_DIR / "__init__.py").read_text(encoding="utf-8").strip() == ""


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_yaml_lists_every_module_the_stage_imports(stage: str, import_closure: dict[str, set[str]]):
    listed = listed_code(stage)
    missing = sorted(import_closure[stage] - listed)
    assert not missing, f"dvc.yaml: stage {stage} imports {missing} but does not list them in its deps"
    # also the imports inside functions (loaded when they run), read from the source
    missing = sorted(static_closure(stage) - listed)
    assert not missing, f"dvc.yaml: stage {stage} may import {missing} (inside a function) but does not list them"
    absent = sorted(f for f in listed if not (REPO / f).is_file())
    assert not absent, f"dvc.yaml: stage {stage} lists files that do not exist: {absent}"


@pytest.mark.parametrize("stage", EXTRACTION_STAGES)
def test_stage_code_files_of_an_extraction_stage_cover_its_imports(stage: str, import_closure: dict[str, set[str]]):
    files = stage_code_files(stage)
    assert files == sorted(files) and all(f.is_file() for f in files)
    relative = {f.resolve().relative_to(REPO).as_posix() for f in files}
    assert relative == listed_code(stage)  # one list: dvc.yaml's
    assert relative >= import_closure[stage], sorted(import_closure[stage] - relative)
    assert relative >= static_closure(stage), sorted(static_closure(stage) - relative)
    # the code its features depend on, beyond the stage module: the model, cache and report code
    assert {
        f"pipeline/{stage.split('_')[1]}_features.py",
        "pipeline/encoders.py",
        "pipeline/extraction_cache.py",
        "pipeline/feature_table.py",
    } <= relative


def test_stage_code_files_without_dvc_yaml_or_stage_is_every_module(tmp_path: Path):
    every = sorted(PACKAGE_DIR.glob("*.py"))
    assert stage_code_files("extract_text", tmp_path / "absent.yaml") == every
    assert stage_code_files("no_such_stage") == every
    (tmp_path / "dvc.yaml").write_text("stages: [unexpected\n", encoding="utf-8")
    assert stage_code_files("extract_text", tmp_path / "dvc.yaml") == every
    assert code_fingerprint("no_such_stage") != code_fingerprint("extract_text")


def test_code_fingerprint_follows_the_listed_files(tmp_path: Path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "a.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "pipeline" / "b.py").write_text("y = 2\n", encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "extract_text": {
                        "cmd": "-",
                        "deps": [
                            "pipeline/b.py",
                            "pipeline/a.py",
                            "data/prepared/utterances.csv",
                            {"pipeline/c.py": None},
                        ],
                    }
                }
            }
        ),
        encoding="utf-8",
    )
    dvc_yaml = tmp_path / "dvc.yaml"
    listed = [tmp_path / "pipeline" / "a.py", tmp_path / "pipeline" / "b.py"]
    assert stage_code_files("extract_text", dvc_yaml) == listed  # sorted; only pipeline/*.py strings
    before = code_fingerprint("extract_text", dvc_yaml)
    assert code_fingerprint("extract_text", dvc_yaml) == before  # deterministic
    (tmp_path / "pipeline" / "b.py").write_text("y = 3\n", encoding="utf-8")
    assert code_fingerprint("extract_text", dvc_yaml) != before
    (tmp_path / "pipeline" / "b.py").write_text("y = 2\n", encoding="utf-8")
    assert code_fingerprint("extract_text", dvc_yaml) == before


# --- the resume cache's key ---------------------------------------------------------------------------------------


def test_cache_key_covers_settings_code_and_weights_but_not_runtime_settings(tmp_path: Path):
    def key(settings=None, code="c1", weights_id="w1", modality="text", dim=4):
        settings = {"model": "m", "pooling": "mean", "batch_size": 8} if settings is None else settings
        return ExtractionCache(modality, settings, dim, tmp_path, code=code, weights_id=weights_id).key

    base = key()
    assert key() == base
    assert key(code="c2") != base
    assert key(weights_id="w2") != base and key(weights_id=None) != base
    assert key({"model": "m", "pooling": "cls", "batch_size": 8}) != base
    assert key(dim=5) != base
    # runtime-only settings (speed, or whether the stage accepts the result) keep the key
    assert (
        key({"model": "m", "pooling": "mean", "batch_size": 1, "cuda_dtype": "bfloat16", "max_masked_share": 0.9})
        == base
    )
    # by default the key holds the code of extract_<modality> as dvc.yaml lists it
    default = ExtractionCache("text", {"model": "m"}, 4, tmp_path, weights_id="w1")
    explicit = ExtractionCache(
        "text", {"model": "m"}, 4, tmp_path, weights_id="w1", code=code_fingerprint("extract_text")
    )
    assert default.key == explicit.key
    assert json.loads((default.dir / "settings.json").read_text())["code"] == code_fingerprint("extract_text")
    for modality in ("audio", "visual"):
        assert (
            ExtractionCache(modality, {}, 4, tmp_path, weights_id="w").key
            == ExtractionCache(
                modality, {}, 4, tmp_path, weights_id="w", code=code_fingerprint(f"extract_{modality}")
            ).key
        )


def test_cache_results_resume_only_under_the_same_key(tmp_path: Path):
    with ExtractionCache("text", {"model": "m"}, 2, tmp_path, code="c1", weights_id="w") as cache:
        cache.put("a", "sig", torch.tensor([1.0, 2.0]))
    same = ExtractionCache("text", {"model": "m"}, 2, tmp_path, code="c1", weights_id="w")
    assert same.is_done("a", "sig") and not same.is_done("a", "edited input")
    other_code = ExtractionCache("text", {"model": "m"}, 2, tmp_path, code="c2", weights_id="w")
    other_weights = ExtractionCache("text", {"model": "m"}, 2, tmp_path, code="c1", weights_id="w2")
    assert not other_code.is_done("a", "sig") and not other_weights.is_done("a", "sig")


# --- command lines ---------------------------------------------------------------------------------------------


def command_options(stage: str) -> tuple[str, list[str]]:
    """(module run by the stage's cmd, its ``--option`` names in order)."""
    cmd = " ".join(STAGES[stage]["cmd"].split())
    match = re.match(r"python -m (pipeline\.\w+)\s", cmd)
    assert match, cmd
    return match.group(1), re.findall(r"--([a-z][a-z0-9-]*)", cmd)


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "predict"])
def test_stage_command_passes_every_path_its_run_takes(stage: str):
    import importlib

    module_name, options = command_options(stage)
    assert module_name == f"pipeline.{stage}"
    assert len(options) == len(set(options)), options
    run = importlib.import_module(module_name).run
    parameters = inspect.signature(run).parameters
    given = {o.replace("-", "_") for o in options}
    required = {name for name, p in parameters.items() if name != "params" and p.default is inspect.Parameter.empty}
    assert required <= given, f"dvc.yaml: stage {stage} does not pass {sorted(required - given)}"
    unknown = sorted(given - (set(parameters) - {"params"}))
    assert not unknown, f"dvc.yaml: stage {stage} passes options its run() does not take: {unknown}"
    for value in re.findall(r"--[a-z-]+\s+(\S+)", " ".join(STAGES[stage]["cmd"].split())):
        assert value.startswith("${paths."), f"{stage}: a path written outside vars: {value}"


def test_predict_command_options_exist(capsys):
    from pipeline import predict

    module_name, options = command_options("predict")
    assert module_name == "pipeline.predict"
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in options:
        assert f"--{option}" in help_text, option


def test_run_stage_requires_every_path_and_passes_them_as_paths(tmp_path: Path, capsys):
    calls = []

    def stage(params, utterances: Path, out_dir: Path) -> None:
        calls.append((params, utterances, out_dir))

    paths = {"utterances": "the table", "out-dir": "the output folder"}
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 0.01\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        run_stage(stage, "test stage", paths, ["--params", str(params), "--utterances", "u.csv"])
    assert exit_info.value.code == 2 and "--out-dir" in capsys.readouterr().err and calls == []
    run_stage(stage, "test stage", paths, ["--params", str(params), "--utterances", "u.csv", "--out-dir", "o"])
    ((loaded, utterances, out_dir),) = calls
    assert loaded.train.lr == 0.01 and utterances == Path("u.csv") and out_dir == Path("o")


def test_run_stage_turns_a_lost_modality_into_one_error(tmp_path: Path, capsys):
    def stage(params, out: Path) -> None:
        raise ModalityLostError("audio: 3 of 3 utterances (100%) lost their audio modality")

    with pytest.raises(SystemExit) as exit_info:
        run_stage(stage, "test stage", {"out": "folder"}, ["--params", str(tmp_path / "absent.yaml"), "--out", "o"])
    assert exit_info.value.code == 1  # params file missing: a ParamsError, reported the same way
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "params.yaml").write_text("{}\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        run_stage(stage, "test stage", {"out": "folder"}, ["--params", str(tmp_path / "params.yaml"), "--out", "o"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: audio: 3 of 3 utterances (100%) lost their audio modality\n"


def test_a_missing_data_root_stops_dvc_repro_with_the_projects_message(tmp_path: Path):
    """DVC checks ``prepare``'s ``${data.root}`` dependency before running it; ``check_data`` runs first."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["root"] = "data/raw/nowhere"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "prepare"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: data.root data/raw/nowhere does not exist; point data.root in params.yaml" in output
    assert "Errno 2" not in output


def test_runtime_is_listed_by_no_stage_and_sets_torch_threads():
    """``runtime.*`` says how to run, not what to compute: no stage lists it (a change re-runs nothing)."""
    from pipeline.cli import apply_runtime
    from pipeline.config import parse_params

    for name, stage in STAGES.items():
        assert not any(str(p).startswith("runtime") for p in stage.get("params", [])), name
    before = torch.get_num_threads()
    try:
        apply_runtime(parse_params({"runtime": {"threads": 1}}))
        assert torch.get_num_threads() == 1
        apply_runtime(parse_params({}))  # unset: left as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
