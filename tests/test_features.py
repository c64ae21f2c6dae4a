"""pipeline.feature_table (the safetensors feature table) and pipeline.atomic (atomic writes)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from pipeline.atomic import atomic_path, write_json
from pipeline.feature_table import REASONS, FeatureTable, feature_path, load_table, save_table


def make_table() -> FeatureTable:
    torch.manual_seed(0)
    features = torch.randn(4, 3)
    features[1] = 0
    return FeatureTable(
        utterance_ids=["train/dia0_utt0", "train/dia0_utt1", "dev/dia3_utt2", "test/dia1_utt0"],
        features=features,
        mask=torch.tensor([True, False, True, False]),
        reasons=["ok", "no_audio", "ok", "decode_error"],
        info={"model": "tiny", "pretrained": False, "hidden_size": 3, "nested": {"a": [1, 2]}},
    )


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_save_load_round_trip(tmp_path: Path):
    table = make_table()
    path = tmp_path / "sub" / "audio.safetensors"
    save_table(table, path)
    loaded = load_table(path)
    assert loaded.utterance_ids == table.utterance_ids
    assert torch.equal(loaded.features, table.features) and loaded.features.dtype == torch.float32
    assert loaded.mask.dtype == torch.bool and loaded.mask.tolist() == [True, False, True, False]
    assert loaded.reasons == ["ok", "no_audio", "ok", "decode_error"]
    assert loaded.info == table.info
    assert loaded.dim == 3
    assert loaded.reason_counts() == {"ok": 2, "no_audio": 1, "decode_error": 1}


def test_every_reason_code_round_trips(tmp_path: Path):
    n = len(REASONS)
    table = FeatureTable(
        [f"train/dia0_utt{i}" for i in range(n)],
        torch.zeros(n, 2),
        torch.tensor([r == "ok" for r in REASONS]),
        list(REASONS),
    )
    save_table(table, tmp_path / "t.safetensors")
    assert load_table(tmp_path / "t.safetensors").reasons == list(REASONS)


def test_reason_codes_are_append_only():
    # a reason's index is what the feature files store: the codes of earlier files keep their meaning
    assert REASONS[:7] == ("ok", "missing_clip", "no_audio", "no_face", "decode_error", "empty_text", "no_video")
    assert REASONS[7:] == ("corrupt", "truncated") and len(set(REASONS)) == len(REASONS) < 256  # stored as uint8


def test_feature_path_is_inside_the_given_folder(tmp_path: Path):
    assert feature_path("audio", tmp_path / "f") == tmp_path / "f" / "audio.safetensors"
    assert feature_path("text", "data/features") == Path("data/features/text.safetensors")


def test_float64_and_non_contiguous_features_are_stored_as_float32(tmp_path: Path):
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    table = FeatureTable(["a", "b", "c"], base.t()[:3, :].t(), torch.ones(3, dtype=torch.bool), ["ok"] * 3)
    assert not table.features.is_contiguous()
    save_table(table, tmp_path / "t.safetensors")
    loaded = load_table(tmp_path / "t.safetensors")
    assert loaded.features.dtype == torch.float32
    assert torch.equal(loaded.features, base.t()[:3, :].t().float())


def test_rows_follow_the_requested_order():
    table = make_table()
    features, mask = table.rows(["test/dia1_utt0", "train/dia0_utt0", "dev/dia3_utt2", "train/dia0_utt0"])
    assert torch.equal(features, table.features[[3, 0, 2, 0]])
    assert mask.tolist() == [False, True, True, True]


def test_rows_unknown_id_raises_key_error():
    with pytest.raises(ValueError, match="stale"):
        make_table().rows(["train/dia0_utt0", "train/dia9_utt9"])


@pytest.mark.parametrize("change", ["ids", "features", "mask", "reasons"])
def test_mismatched_lengths_are_rejected(change: str):
    kwargs = dict(
        utterance_ids=["a", "b"], features=torch.zeros(2, 3), mask=torch.ones(2, dtype=torch.bool), reasons=["ok", "ok"]
    )
    kwargs[{"ids": "utterance_ids"}.get(change, change)] = {
        "ids": ["a"],
        "features": torch.zeros(3, 3),
        "mask": torch.ones(1, dtype=torch.bool),
        "reasons": ["ok"],
    }[change]
    with pytest.raises(ValueError, match="disagree"):
        FeatureTable(**kwargs)


def test_unknown_reason_is_rejected():
    with pytest.raises(ValueError, match="'no_smell'"):
        FeatureTable(["a"], torch.zeros(1, 2), torch.zeros(1, dtype=torch.bool), ["no_smell"])


def test_load_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="dvc repro"):
        load_table(tmp_path / "absent.safetensors")


def test_atomic_path_keeps_the_old_file_when_the_block_raises(tmp_path: Path):
    target = tmp_path / "report.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp != target and tmp.parent == target.parent
            tmp.write_text("half-writ", encoding="utf-8")
            raise RuntimeError("killed mid-write")
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary left behind


def test_atomic_path_replaces_on_success(tmp_path: Path):
    target = tmp_path / "deep" / "dir" / "x.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new", encoding="utf-8")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text(encoding="utf-8") == "new"
    assert [p.name for p in target.parent.iterdir()] == ["x.txt"]


def test_written_files_get_normal_permissions(tmp_path: Path, umask_022):
    save_table(make_table(), tmp_path / "t.safetensors")
    write_json({"a": 1}, tmp_path / "r.json")
    for path in (tmp_path / "t.safetensors", tmp_path / "r.json"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode != 0o600 and mode == 0o644, oct(mode)


def test_write_json_converts_numpy_and_paths(tmp_path: Path):
    import numpy as np

    write_json({"n": np.int64(3), "x": np.float32(0.5), "p": Path("a/b")}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == {"n": 3, "x": 0.5, "p": "a/b"}
    with pytest.raises(TypeError):
        write_json({"bad": object()}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
