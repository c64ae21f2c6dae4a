"""The memory-mapped feature reader (pipeline.feature_table.open_table) and load_dialogues on top of it:
the same rows, byte for byte, as whole-file loading; clear errors for damaged files; and loading the
dialogues of a few rows does not read a whole feature file into memory."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import GraphParams
from pipeline.data import MODALITIES, MappedFeatures, batches, collate, load_dialogues
from pipeline.feature_table import (
    REASONS,
    FeatureTable,
    MappedFeatureTable,
    feature_path,
    load_table,
    open_table,
    save_table,
)
from pipeline.graphs import build_dialogue_graph
from pipeline.utterances import Utterance

REPO = Path(__file__).resolve().parents[1]
EMOTIONS = ["neutral", "joy", "anger"]
SENTIMENTS = ["negative", "neutral", "positive"]


def random_table(ids: list[str], dim: int, seed: int) -> FeatureTable:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(len(ids), generator=g) > 0.3
    features = torch.randn(len(ids), dim, generator=g) * mask[:, None]  # masked rows are zeros
    reasons = ["ok" if m else REASONS[1 + int(i) % (len(REASONS) - 1)] for i, m in enumerate(mask)]
    return FeatureTable(ids, features, mask, reasons, {"model": f"random-{seed}", "dim": dim})


def corpus(n_dialogues: int, seed: int = 0) -> list[Utterance]:
    """Utterances of ``n_dialogues`` dialogues of 1-6 utterances over the three splits."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in range(n_dialogues):
        split = ("train", "dev", "test")[d % 3]
        for i in range(int(torch.randint(1, 7, (1,), generator=g))):
            out.append(
                Utterance(
                    f"{split}/dia{d}_utt{i}",
                    split,
                    f"{split}/{d}",
                    i,
                    "AB"[int(torch.randint(0, 2, (1,), generator=g))],
                    "text",
                    EMOTIONS[(d + i) % 3],
                    SENTIMENTS[i % 3],
                )
            )
    return out


def graphs_of(utterances: list[Utterance]) -> dict:
    speakers: dict[str, list[str]] = {}
    for u in utterances:
        speakers.setdefault(u.dialogue_id, []).append(u.speaker)
    return {d: build_dialogue_graph(s, GraphParams()) for d, s in speakers.items()}


def write_features(folder: Path, utterances: list[Utterance], shuffle: tuple[str, ...] = ()) -> dict[str, Path]:
    """The three feature files; the modalities in ``shuffle`` get their rows in a random order (so a
    dialogue's rows are not contiguous there)."""
    ids = [u.utterance_id for u in utterances]
    paths = {}
    for k, (m, dim) in enumerate({"text": 12, "audio": 5, "visual": 7}.items()):
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(k)) if m in shuffle else None
        table = random_table([ids[i] for i in order] if order is not None else ids, dim, seed=k)
        paths[m] = feature_path(m, folder)
        save_table(table, paths[m])
    return paths


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


# ---------------------------------------------------------------------------------------------
# the mapped reader


def test_mapped_rows_equal_whole_file_rows(tmp_path: Path):
    ids = [f"train/dia{i // 4}_utt{i % 4}" for i in range(40)]
    save_table(random_table(ids, 9, seed=1), tmp_path / "t.safetensors")
    whole, mapped = load_table(tmp_path / "t.safetensors"), open_table(tmp_path / "t.safetensors")
    assert isinstance(mapped, MappedFeatureTable) and isinstance(mapped.array, np.memmap)
    assert mapped.utterance_ids == whole.utterance_ids and mapped.info == whole.info and mapped.dim == whole.dim == 9
    assert mapped.reasons == whole.reasons and mapped.reason_counts() == whole.reason_counts()
    assert torch.equal(mapped.mask, whole.mask) and mapped.mask.dtype == torch.bool
    for wanted in (
        ids[8:12],  # contiguous: one slice
        ids[:1],
        ids,
        ids[12:8:-1],  # reversed
        [ids[30], ids[2], ids[17], ids[2]],  # scattered, with a repeat
        [],
    ):
        features, mask = mapped.rows(wanted)
        expected_features, expected_mask = whole.rows(wanted)
        assert same_bytes(features, expected_features) and torch.equal(mask, expected_mask), wanted
    assert mapped.locate(ids[8:12]) == slice(8, 12)
    assert mapped.locate([ids[3], ids[1]]).tolist() == [3, 1]


def test_mapped_rows_are_writable_copies(tmp_path: Path):
    ids = [f"a{i}" for i in range(5)]
    save_table(random_table(ids, 3, seed=2), tmp_path / "t.safetensors")
    mapped = open_table(tmp_path / "t.safetensors")
    before = mapped.rows(ids[1:3])[0].clone()
    for wanted in (ids[1:3], [ids[2], ids[1]]):
        features, mask = mapped.rows(wanted)
        features += 100.0
        mask[:] = ~mask
    after, mask = mapped.rows(ids[1:3])
    assert torch.equal(after, before) and torch.equal(mask, load_table(tmp_path / "t.safetensors").mask[1:3])


def test_mapped_rows_unknown_id_raises_value_error(tmp_path: Path):
    save_table(random_table(["a", "b"], 3, seed=0), tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="stale"):
        open_table(tmp_path / "t.safetensors").rows(["a", "zzz"])


def test_missing_file_says_which_stage(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="dvc repro"):
        open_table(tmp_path / "absent.safetensors")


def test_empty_table_opens(tmp_path: Path):
    save_table(FeatureTable([], torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool), []), tmp_path / "e.safetensors")
    table = open_table(tmp_path / "e.safetensors")
    assert len(table) == 0 and table.dim == 4 and table.rows([])[0].shape == (0, 4)


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    header, data = header_of(path)
    if how == "truncated":
        path.write_bytes(raw[:-10])
    elif how == "cut_in_header":
        path.write_bytes(raw[:40])
    elif how == "shorter_than_8_bytes":
        path.write_bytes(raw[:5])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "extra_bytes":
        path.write_bytes(raw + b"\0" * 16)
    elif how == "huge_header_length":
        path.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    elif how == "garbage_header":
        path.write_bytes(raw[:8] + b"\xff" * (len(raw) - 8))
    elif how == "no_metadata":
        del header["__metadata__"]
        path.write_bytes(with_header(header, data))
    elif how == "float64":  # a file safetensors reads fine, but not float32 features
        ids = json.loads(header["__metadata__"]["erc"])["utterance_ids"]
        save_file(
            {
                "features": torch.zeros(len(ids), 3, dtype=torch.float64),
                "mask": torch.ones(len(ids), dtype=torch.uint8),
                "reason": torch.zeros(len(ids), dtype=torch.uint8),
            },
            str(path),
            metadata=header["__metadata__"],
        )
    elif how == "three_d":
        header["features"]["shape"] = [header["features"]["shape"][0], 3, 1]
        path.write_bytes(with_header(header, data))
    elif how == "rows_disagree_with_ids":
        meta = json.loads(header["__metadata__"]["erc"])
        meta["utterance_ids"].append("extra")
        header["__metadata__"]["erc"] = json.dumps(meta)
        path.write_bytes(with_header(header, data))
    elif how == "ids_not_a_list":  # three characters for three rows
        meta = json.loads(header["__metadata__"]["erc"])
        meta["utterance_ids"] = "abc"
        header["__metadata__"]["erc"] = json.dumps(meta)
        path.write_bytes(with_header(header, data))
    elif how == "offsets_disagree_with_shape":
        header["features"]["shape"][1] = 2
        path.write_bytes(with_header(header, data))
    elif how == "unknown_reason":
        begin = header["reason"]["data_offsets"][0]
        path.write_bytes(with_header(header, data[:begin] + b"\xfe" + data[begin + 1 :]))
    else:
        raise AssertionError(how)


DAMAGES = [
    "truncated",
    "cut_in_header",
    "shorter_than_8_bytes",
    "empty",
    "extra_bytes",
    "huge_header_length",
    "garbage_header",
    "no_metadata",
    "float64",
    "three_d",
    "rows_disagree_with_ids",
    "ids_not_a_list",
    "offsets_disagree_with_shape",
    "unknown_reason",
]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_file_gives_a_clear_value_error(tmp_path: Path, how: str):
    path = tmp_path / "audio.safetensors"
    save_table(random_table(["a", "b", "c"], 3, seed=0), path)
    damage(path, how)
    with pytest.raises(ValueError, match=r"audio\.safetensors: not a complete feature file .*rerun the stage"):
        open_table(path)


def test_load_dialogues_reports_a_truncated_feature_file(tmp_path: Path):
    utterances = corpus(6)
    paths = write_features(tmp_path, utterances)
    damage(paths["visual"], "truncated")
    with pytest.raises(ValueError, match=r"visual\.safetensors: .*truncated.*rerun the stage"):
        load_dialogues(EMOTIONS, SENTIMENTS, utterances, tmp_path, graphs_of(utterances))


# ---------------------------------------------------------------------------------------------
# load_dialogues on mapped tables


@pytest.mark.parametrize("shuffle", [(), ("audio",)], ids=["contiguous", "audio_rows_shuffled"])
def test_dialogues_read_the_same_bytes_as_whole_file_loading(tmp_path: Path, shuffle: tuple[str, ...]):
    utterances = corpus(30)
    write_features(tmp_path, utterances, shuffle)
    whole = {m: load_table(feature_path(m, tmp_path)) for m in MODALITIES}
    splits, encoders = load_dialogues(EMOTIONS, SENTIMENTS, utterances, tmp_path, graphs_of(utterances))
    assert encoders == {m: whole[m].info for m in MODALITIES}
    assert sum(len(d) for s in splits.values() for d in s) == len(utterances)
    kinds = set()  # (modality, slice or array): how each dialogue's rows are read
    for dialogues in splits.values():
        for d in dialogues:
            assert isinstance(d.features, MappedFeatures) and list(d.features) == list(MODALITIES)
            for m in MODALITIES:
                features, mask = whole[m].rows(d.utterance_ids)
                assert same_bytes(d.features[m], features) and torch.equal(d.masks[m], mask)
                kinds.add((m, type(d.features.rows[m])))
        # batches read the rows straight into the batch tensor: the same bytes as concatenating
        for batch in batches(dialogues, 4, shuffle=True):
            for m in MODALITIES:
                features, mask = whole[m].rows(batch.utterance_ids)
                assert same_bytes(batch.features[m], features) and torch.equal(batch.masks[m], mask)
    # contiguous rows are read as one slice; the shuffled file's rows are gathered (but for the
    # dialogues whose rows happen to stay consecutive)
    assert {m for m, kind in kinds if kind is slice} == set(MODALITIES)
    assert {m for m, kind in kinds if kind is np.ndarray} == set(shuffle)
    # files with the same ids in the same order share one id list and lookup
    tables = splits["train"][0].features.tables
    assert all((tables[m].utterance_ids is tables["text"].utterance_ids) == (m not in shuffle) for m in MODALITIES)


def test_dialogues_work_with_replace_and_mixed_batches(tmp_path: Path):
    utterances = corpus(6)
    write_features(tmp_path, utterances)
    splits, _ = load_dialogues(EMOTIONS, SENTIMENTS, utterances, tmp_path, graphs_of(utterances))
    d = splits["train"][0]
    relabelled = replace(d, emotion=torch.zeros_like(d.emotion))  # as evaluate does for cross-corpus runs
    assert relabelled.features is d.features and torch.equal(relabelled.features["text"], d.features["text"])
    in_memory = replace(splits["train"][1], features={m: splits["train"][1].features[m] for m in MODALITIES})
    batch = collate([d, in_memory])
    for m in MODALITIES:
        assert torch.equal(batch.features[m], torch.cat([d.features[m], in_memory.features[m]]))


def test_pickled_dialogues_reopen_the_file_instead_of_copying_it(tmp_path: Path):
    utterances = corpus(30)
    paths = write_features(tmp_path, utterances)
    splits, _ = load_dialogues(EMOTIONS, SENTIMENTS, utterances, tmp_path, graphs_of(utterances))
    d = splits["train"][0]
    blob = pickle.dumps(d.features)
    assert len(blob) < paths["text"].stat().st_size  # the features were not copied into the pickle
    copy = pickle.loads(blob)
    assert all(same_bytes(copy[m], d.features[m]) for m in MODALITIES)
    # a rewritten file is not silently read in place of the one the dialogues were loaded from
    save_table(load_table(paths["text"]), paths["text"])
    with pytest.raises(ValueError, match="changed since"):
        pickle.loads(blob)
    assert same_bytes(d.features["text"], copy["text"])  # the open mappings still read the old file


# ---------------------------------------------------------------------------------------------
# memory: loading the dialogues of a few rows does not read the feature file

ROWS, DIM = 10_000, 2048  # an 80 MB text feature file

MEASURE = r"""
import ctypes, json, re, sys
from pathlib import Path
import torch
from pipeline.config import GraphParams
from pipeline.data import batches, load_dialogues
from pipeline.feature_table import feature_path, load_table
from pipeline.graphs import build_dialogue_graph
from pipeline.utterances import Utterance

folder, rows, length = Path(sys.argv[1]), int(sys.argv[2]), 10

def status(key):  # bytes, from /proc/self/status
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

def held():  # process memory (not file pages) in use now, bytes: freed heap memory returned first
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: memory the allocator keeps counts too (bigger numbers, same ratios)
    return status("RssAnon")

def reset_peak():  # Linux >= 4.0: resets VmHWM, so that it is the peak since now
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak may then be an earlier one: the positive control below would fail, not pass
    return status("VmHWM")

def inputs(numbers):
    utts = [Utterance(f"u{r}", "train", f"d{r // length}", r % length, "AB"[r % 2], "t", "x", "x") for r in numbers]
    speakers = {}
    for u in utts:
        speakers.setdefault(u.dialogue_id, []).append(u.speaker)
    return utts, {d: build_dialogue_graph(s, GraphParams()) for d, s in speakers.items()}

def load(utts, graphs):
    return load_dialogues(["x"], ["x"], utts, folder, graphs)[0]["train"]

few = inputs([*range(100, 110), *range(5000, 5010), *range(rows - 10, rows)])
list(batches(load(*few), 2, False))  # warm-up: imports, first allocations
out = {}

# 1. the dialogues of 30 rows: loading them and reading their batches barely moves the peak RSS
start = reset_peak()
dialogues = load(*few)
read = torch.cat([b.features["text"] for b in batches(dialogues, 2, shuffle=False)])
out["few_peak"] = status("VmHWM") - start
whole = load_table(feature_path("text", folder))
out["same"] = torch.equal(read, whole.rows([u.utterance_id for u in few[0]])[0])
# positive control: reading the whole file's features does show in the peak RSS
start = reset_peak()
float(whole.features.sum())
out["whole_peak"] = status("VmHWM") - start
del whole

# 2. all dialogues, and one pass over their batches: the dialogues hold no features in process
# memory (RssAnon; the file pages read, RssFile, are the kernel's to drop when memory is short)
everything = inputs(range(rows))
start = held()
dialogues = load(*everything)
for batch in batches(dialogues, 16, shuffle=False):
    pass
del batch
out["all_anon"] = held() - start
# positive control: what load_dialogues kept before, a copy of every dialogue's rows
start = held()
table = load_table(feature_path("text", folder))
copies = [table.rows(d.utterance_ids) for d in dialogues]
out["copies_anon"] = held() - start
out["dialogues"] = len(dialogues)
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and ru_maxrss in KiB")
def test_load_dialogues_does_not_read_whole_feature_files(tmp_path: Path):
    ids = [f"u{r}" for r in range(ROWS)]
    features = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))
    save_table(
        FeatureTable(ids, features, torch.ones(ROWS, dtype=torch.bool), ["ok"] * ROWS), feature_path("text", tmp_path)
    )
    del features
    for m in ("audio", "visual"):
        save_table(random_table(ids, 4, seed=1), feature_path(m, tmp_path))
    size = feature_path("text", tmp_path).stat().st_size
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path), str(ROWS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["same"] and measured["dialogues"] == ROWS // 10
    # the positive controls: the measures do see a whole file's features read or held ...
    assert measured["whole_peak"] > 0.9 * size and measured["copies_anon"] > 0.9 * size, measured
    # ... and the dialogues of 30 rows (240 KB of features) cost a small fraction of the file
    assert measured["few_peak"] < size / 10, measured
    # ... and all the dialogues, after a pass over their batches, hold no copy of the features
    assert measured["all_anon"] < size / 4, measured
