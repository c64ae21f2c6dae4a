"""What an extraction stage writes beside its features, what it logs, and the modality guard.

The report (``<modality>_report.json``) is a DVC-tracked output, so it holds only what the inputs,
settings and code determine: counts per reason code, the masked utterance ids per reason, the encoder
and its weights, per-utterance diagnostics, and the utterances that a policy changed without masking
them (:data:`NAMED_ROWS`: a clip encoded from the part that decoded, a segment end clamped to the media,
a text cut to ``text.max_length``), each listed by id and summarised in the log. Timings, throughput,
the device and how much came from the resume cache change from run to run: they go to the log, never
into a tracked file, so that re-running an unchanged pipeline changes no tracked file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.feature_table import FeatureTable, feature_path, save_table

# Reasons that say the data has no such modality for an utterance, rather than that it was lost:
# an audio-only file has no video. The modality guard does not count them.
NOT_LOST = frozenset({"ok", "no_video"})
# Report keys that list the utterances a policy changed without masking them ({utterance_id: facts}),
# and what the log's summary line says of them ({m}: the modality).
NAMED_ROWS = {
    "partial": "were cut short and encoded from the part that decoded ({m}.on_truncated=use_partial)",
    "segment_clamped": "have a segment end beyond their media, clamped to the media's end",
    "truncated_to_max_length": "had their own tokens cut to text.max_length",
}


class ModalityLostError(ValueError):
    """Too large a share of the utterances lost a modality the data has (see :func:`check_masked_share`)."""


def finish_extraction(
    modality: str,
    table: FeatureTable,
    features_dir: Path,
    extra: dict | None = None,
    run_facts: dict | None = None,
    named: dict[str, dict[str, object]] | None = None,
) -> dict:
    """Write a modality's feature file and its report (``<modality>_report.json``); log a summary line.

    Args:
        extra: more deterministic report fields (diagnostics per clip, audio seconds decoded ...).
        run_facts: what changes from run to run (``seconds``, ``device``, ``resumed_from_cache`` ...):
            logged, not written.
        named: the utterances a policy changed without masking them: report key (one of
            :data:`NAMED_ROWS`) -> ``{utterance_id: facts}``. Written into the report (in table order),
            and each non-empty key summarised in one log line: its count and the first few ids.

    Raises:
        ValueError: a ``named`` key outside :data:`NAMED_ROWS`.

    Returns:
        the report dict (as written), with ``run`` = ``run_facts`` added for the caller.
    """
    save_table(table, feature_path(modality, features_dir))
    masked: dict[str, list[str]] = {}
    for uid, reason in zip(table.utterance_ids, table.reasons):
        if reason != "ok":
            masked.setdefault(reason, []).append(uid)
    unknown = set(named or {}) - set(NAMED_ROWS)
    if unknown:
        raise ValueError(f"unknown report keys {sorted(unknown)} for named rows; known: {sorted(NAMED_ROWS)}")
    order = {uid: i for i, uid in enumerate(table.utterance_ids)}
    named = {
        key: dict(sorted(rows.items(), key=lambda kv: order.get(kv[0], len(order))))
        for key, rows in (named or {}).items()
    }
    n = len(table.utterance_ids)
    report = {
        "modality": modality,
        "utterances": n,
        "dim": table.dim,
        "reasons": table.reason_counts(),
        "masked": masked,
        "encoder": table.info,
        **(extra or {}),
        **named,
    }
    write_json(report, Path(features_dir) / f"{modality}_report.json")
    facts = dict(run_facts or {})
    seconds = facts.get("seconds")
    if seconds:
        facts["utterances_per_second"] = round(n / seconds, 2)
    log = logging.getLogger(f"pipeline.extract_{modality}")
    for key, rows in named.items():
        if rows:
            ids = list(rows)
            log.warning(
                "%s: %d of %d utterances %s (listed under %r in %s_report.json), e.g. %s",
                modality,
                len(ids),
                n,
                NAMED_ROWS[key].format(m=modality),
                key,
                modality,
                ", ".join(ids[:3]),
            )
    log.info(
        "%s: %d utterances, %d present, masked %s, encoder %s (pretrained=%s, weights %s); run: %s",
        modality,
        n,
        int(table.mask.sum()),
        {k: len(v) for k, v in masked.items()} or "none",
        table.info.get("model"),
        table.info.get("pretrained"),
        table.info.get("weights_id"),
        ", ".join(f"{k} {v}" for k, v in facts.items()) or "-",
    )
    return {**report, "run": facts}


def check_masked_share(
    report: dict, max_share: float, has_modality: bool, sources: dict[str, str] | None = None, examples: int = 3
) -> None:
    """Stop a stage whose modality mostly vanished: a broken decoder or a wrong folder, not bad clips.

    The share counts every masked utterance of the report (:func:`finish_extraction`'s) except those
    whose reason says the data has no such modality (:data:`NOT_LOST`). Nothing is checked when the
    data has no such modality at all (``has_modality`` False: a text-only manifest has no audio or video).

    Args:
        max_share: the largest acceptable share in [0, 1] (``<modality>.max_masked_share``).
        sources: utterance id -> the file it came from, for the examples in the message.

    Raises:
        ModalityLostError: naming the share, the top reasons with example utterances and files, and
            what to do.
    """
    modality, n = report["modality"], report["utterances"]
    lost = {reason: ids for reason, ids in report["masked"].items() if reason not in NOT_LOST}
    count = sum(len(ids) for ids in lost.values())
    if not has_modality or n == 0 or count / n <= max_share:
        return
    lines = []
    for reason, ids in sorted(lost.items(), key=lambda kv: -len(kv[1]))[:3]:
        shown = ", ".join(f"{uid} ({(sources or {}).get(uid) or 'no file'})" for uid in ids[:examples])
        lines.append(f"{reason}: {len(ids)} utterances, e.g. {shown}")
    raise ModalityLostError(
        f"{modality}: {count} of {n} utterances ({count / n:.0%}) lost their {modality} modality, more than "
        f"{modality}.max_masked_share={max_share:.0%} allows:\n  "
        + "\n  ".join(lines)
        + f"\nThe per-utterance warnings above say why. Check the clips and data.root; if the data really "
        f"lacks {modality} for most utterances, raise {modality}.max_masked_share in params.yaml."
    )
