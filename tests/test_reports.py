"""pipeline.reports: what an extraction stage writes beside its features, and the modality guard.

The stages themselves under the guard (corrupt clips, a text-only manifest) and the byte-identical report of
a warm rerun: tests/test_extract.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from pipeline.feature_table import FeatureTable, load_table
from pipeline.reports import ModalityLostError, check_masked_share, finish_extraction


def report(reasons: list[str], modality: str = "audio") -> dict:
    """A report as :func:`finish_extraction` writes it, for utterances ``u0, u1, ...`` with these reasons."""
    masked: dict[str, list[str]] = {}
    for i, reason in enumerate(reasons):
        if reason != "ok":
            masked.setdefault(reason, []).append(f"u{i}")
    return {"modality": modality, "utterances": len(reasons), "masked": masked}


SOURCES = {f"u{i}": f"clips/c{i}.mp4" for i in range(10)}


def test_guard_passes_at_and_below_the_threshold():
    check_masked_share(report(["ok"] * 10), 0.5, True, SOURCES)
    check_masked_share(report(["decode_error"] * 3 + ["missing_clip"] * 2 + ["ok"] * 5), 0.5, True, SOURCES)  # 50 %
    check_masked_share(report(["no_audio"] * 4 + ["ok"] * 6), 0.4, True)
    check_masked_share(report(["decode_error"] * 10), 1.0, True, SOURCES)  # 1.0: never fails
    check_masked_share(report([]), 0.0, True)  # no utterances: nothing to judge


def test_guard_raises_above_the_threshold_naming_share_reason_and_a_file():
    reasons = [
        "missing_clip",
        "decode_error",
        "decode_error",
        "no_audio",
        "decode_error",
        "decode_error",
        "ok",
        "ok",
        "ok",
        "ok",
    ]
    with pytest.raises(ModalityLostError) as err:
        check_masked_share(report(reasons), 0.5, True, SOURCES)
    message = str(err.value)
    assert isinstance(err.value, ValueError)  # the stages' command line reports it as one error, exit 1
    assert message.startswith("audio: 6 of 10 utterances (60%) lost their audio modality")
    assert "audio.max_masked_share=50%" in message
    lines = message.splitlines()
    # the reasons, most frequent first, with example utterances and their files
    assert lines[1].strip() == (
        "decode_error: 4 utterances, e.g. u1 (clips/c1.mp4), u2 (clips/c2.mp4), u4 (clips/c4.mp4)"
    )
    assert "missing_clip: 1 utterances, e.g. u0 (clips/c0.mp4)" in message and "no_audio: 1 utterances" in message
    assert "raise audio.max_masked_share in params.yaml" in message
    # just above the threshold fails too; without sources the examples say so
    with pytest.raises(ModalityLostError, match=r"3 of 5 utterances \(60%\).*\n.*u0 \(no file\)"):
        check_masked_share(report(["no_face"] * 3 + ["ok"] * 2, "visual"), 0.59, True)


def test_guard_does_not_count_files_without_the_modality():
    # an audio-only file has no video: not a lost modality
    check_masked_share(report(["no_video"] * 9 + ["ok"], "visual"), 0.5, True, SOURCES)
    check_masked_share(report(["no_video"] * 5 + ["no_face"] * 5, "visual"), 0.5, True, SOURCES)
    with pytest.raises(ModalityLostError) as err:
        check_masked_share(report(["no_video"] * 3 + ["no_face"] * 6 + ["ok"], "visual"), 0.5, True, SOURCES)
    assert "6 of 10 utterances (60%)" in str(err.value) and "no_video" not in str(err.value)


def test_guard_does_nothing_when_the_data_has_no_such_modality():
    check_masked_share(report(["missing_clip"] * 10), 0.0, False, SOURCES)
    check_masked_share(report(["decode_error"] * 10), 0.5, False)


def make_table(reasons: list[str]) -> FeatureTable:
    n = len(reasons)
    return FeatureTable(
        [f"u{i}" for i in range(n)],
        torch.arange(2.0 * n).reshape(n, 2),
        torch.tensor([r == "ok" for r in reasons]),
        reasons,
        {"model": "m", "pretrained": False, "weights_id": "random:x"},
    )


def test_finish_extraction_writes_deterministic_facts_and_returns_the_run_facts(tmp_path: Path, caplog):
    table = make_table(["ok", "missing_clip", "ok", "no_audio"])
    caplog.set_level(logging.INFO, logger="pipeline.extract_audio")
    returned = finish_extraction(
        "audio",
        table,
        tmp_path,
        {"chunked": {"u0": 2}},
        run_facts={"seconds": 2.0, "device": "cpu", "resumed_from_cache": 1},
    )
    written = json.loads((tmp_path / "audio_report.json").read_text(encoding="utf-8"))
    assert written == {
        "modality": "audio",
        "utterances": 4,
        "dim": 2,
        "reasons": {"ok": 2, "missing_clip": 1, "no_audio": 1},
        "masked": {"missing_clip": ["u1"], "no_audio": ["u3"]},
        "encoder": table.info,
        "chunked": {"u0": 2},
    }
    assert returned == {
        **written,
        "run": {"seconds": 2.0, "device": "cpu", "resumed_from_cache": 1, "utterances_per_second": 2.0},
    }
    assert "resumed_from_cache 1" in caplog.text and "seconds 2.0" in caplog.text  # logged, not written
    assert load_table(tmp_path / "audio.safetensors").reasons == table.reasons
    # another run with other timings writes the same bytes
    first = (tmp_path / "audio_report.json").read_bytes()
    finish_extraction("audio", table, tmp_path, {"chunked": {"u0": 2}}, run_facts={"seconds": 9.5, "device": "cuda"})
    assert (tmp_path / "audio_report.json").read_bytes() == first


def test_finish_extraction_lists_named_rows_in_table_order_and_summarises_them(tmp_path: Path, caplog):
    table = make_table(["ok", "ok", "ok", "truncated"])
    named = {
        "partial": {"u2": {"decoded": 0.58, "declared": 2.0}, "u0": {"decoded": 1.1, "declared": 2.5}},
        "segment_clamped": {},
    }
    returned = finish_extraction("visual", table, tmp_path, {"per_clip": {}}, named=named)
    written = json.loads((tmp_path / "visual_report.json").read_text(encoding="utf-8"))
    assert list(written["partial"]) == ["u0", "u2"] and written["partial"]["u2"] == {"decoded": 0.58, "declared": 2.0}
    assert written["segment_clamped"] == {} and returned["partial"] == written["partial"]
    # one warning line per non-empty key: the count, what happened, where they are listed, example ids
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == [
        "visual: 2 of 4 utterances were cut short and encoded from the part that decoded "
        "(visual.on_truncated=use_partial) (listed under 'partial' in visual_report.json), e.g. u0, u2"
    ]
    with pytest.raises(ValueError, match="unknown report keys"):
        finish_extraction("visual", table, tmp_path, named={"clipped": {"u0": 1}})
