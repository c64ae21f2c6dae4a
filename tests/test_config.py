"""pipeline.config: the params.yaml schema, its error messages and loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, load_params, parse_params


def test_numbers_written_as_strings_parse_as_numbers():
    # `dvc exp run -S train.lr=1e-4` writes 1e-4, which PyYAML (YAML 1.1) reads as the string "1e-4".
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"
    params = parse_params(yaml.safe_load("train:\n  lr: 1e-4\n  epochs: '5'\n"))
    assert isinstance(params.train.lr, float) and params.train.lr == pytest.approx(1e-4)
    assert params.train.epochs == 5 and isinstance(params.train.epochs, int)


def test_empty_mapping_gives_defaults_and_sections_are_independent():
    params = parse_params({"graph": {"window_past": 3}})
    assert params.graph.window_past == 3
    assert params.graph.window_future == parse_params({}).graph.window_future
    assert parse_params(None) == parse_params({})


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"train": {"lrr": 0.1}}, "train.lrr"),
        ({"trian": {"lr": 0.1}}, "trian"),
        ({"visual": {"fps": 2, "max_frame": 3}}, "visual.max_frame"),
    ],
)
def test_unknown_keys_are_rejected_naming_the_dotted_key(raw, key):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert f"{key}:" in str(err.value)
    assert "Extra inputs are not permitted" in str(err.value)


@pytest.mark.parametrize(
    "raw, key, detail",
    [
        ({"train": {"lr": -1}}, "train.lr", "greater than 0"),
        ({"train": {"lr": "fast"}}, "train.lr", "'fast'"),
        ({"train": {"epochs": 0}}, "train.epochs", "greater than or equal to 1"),
        ({"graph": {"relations": "speaker_pairs"}}, "graph.relations", "'speaker_pair' or 'same_other'"),
        ({"data": {"missing_clip": "drop"}}, "data.missing_clip", "'drop'"),
        ({"text": {"pooling": "max"}}, "text.pooling", "'cls' or 'mean'"),
        ({"visual": {"min_face_prob": 1.5}}, "visual.min_face_prob", "less than or equal to 1"),
        ({"data": {"emotions": ["joy", "joy"]}}, "data.emotions", "unique"),
        ({"audio": {"on_truncated": "keep"}}, "audio.on_truncated", "'mask' or 'use_partial'"),
        ({"visual": {"on_truncated": "partial"}}, "visual.on_truncated", "'mask' or 'use_partial'"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(raw, key, detail):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    message = str(err.value)
    assert f"{key}:" in message and detail in message


def test_hidden_size_must_be_divisible_by_num_heads():
    with pytest.raises(ParamsError) as err:
        parse_params({"model": {"hidden_size": 130, "num_heads": 4}})
    message = str(err.value)
    assert "model" in message and "hidden_size (130)" in message and "num_heads (4)" in message
    assert parse_params({"model": {"hidden_size": 132, "num_heads": 4}}).model.hidden_size == 132


def test_every_offending_key_is_reported():
    with pytest.raises(ParamsError) as err:
        parse_params({"train": {"lr": 0, "seed": "x"}, "graph": {"window_past": -1}})
    message = str(err.value)
    for key in ("train.lr:", "train.seed:", "graph.window_past:"):
        assert key in message


def test_top_level_must_be_a_mapping():
    with pytest.raises(ParamsError, match="mapping"):
        parse_params(["train", "lr"])


def test_params_are_frozen():
    from pydantic import ValidationError

    params = parse_params({})
    with pytest.raises(ValidationError):
        params.train.lr = 1.0  # type: ignore[misc]


def test_load_params_reads_yaml_and_names_the_file(tmp_path: Path):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  lr: 1e-4\ngraph:\n  relations: speaker_pair\n", encoding="utf-8")
    params = load_params(good)
    assert params.train.lr == pytest.approx(1e-4) and params.graph.relations == "speaker_pair"

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n", encoding="utf-8")
    with pytest.raises(ParamsError) as err:
        load_params(bad)
    assert f"{bad}: train.lr:" in str(err.value)


def test_load_params_missing_file(tmp_path: Path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["train: [lr: 1\n", "train:\n\tlr: 1\n", "a: b: c\n"])
def test_load_params_invalid_yaml(tmp_path: Path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_load_params_on_a_directory_raises_params_error(tmp_path: Path):
    with pytest.raises(ParamsError):
        load_params(tmp_path)


def test_repository_params_validate(repo_root: Path):
    path = repo_root / "params.yaml"
    if not path.exists():
        pytest.skip("no params.yaml at the repository root")
    params = load_params(path)
    # The file's own sections are all read (no silently ignored section).
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    assert set(raw) <= set(type(params).model_fields)


def test_repository_profiles_validate(repo_root: Path):
    profiles = sorted((repo_root / "profiles").glob("*.yaml")) if (repo_root / "profiles").is_dir() else []
    if not profiles:
        pytest.skip("no profiles/*.yaml")
    for path in profiles:
        load_params(path)


def test_on_truncated_defaults_to_mask_and_stays_in_the_extraction_cache_key():
    from pipeline.extraction_cache import RUNTIME_ONLY

    params = parse_params({"visual": {"on_truncated": "use_partial"}})
    assert params.audio.on_truncated == "mask" and params.visual.on_truncated == "use_partial"
    assert "on_truncated" not in RUNTIME_ONLY  # it changes the features
