"""Stage ``finetune_text`` (optional): fine-tune the text encoder on the train split's utterances.

Frozen sentence features cap what the dialogue model can add: the strong ERC systems take their text
features from an encoder fine-tuned on the training dialogues (COSMIC's RoBERTa features behind
DialogueGCN / MMGCN, EmoBERTa in MultiEMO). This stage does that for ``text.model``:

* Input: the extraction's own (:func:`pipeline.text_features.tokenize_inputs`): the utterance alone,
  or with ``text.context_window > 0`` the utterance as "Speaker: text" plus its neighbouring
  utterances of the dialogue as a second segment (EmoBERTa, Kim & Vossen 2021, arXiv 2108.12009;
  CoMPM, Lee & Lee 2022, uses the past only). Pooling and layers as the extraction
  (``text.pooling``, ``text.last_k_layers``), so the features ``extract_text`` makes afterwards are
  the vectors the classifier was trained on.
* Model: the encoder, dropout, then two linear heads: emotion and, as a second task, sentiment.
  Loss ``CE(emotion) + text.finetune.sentiment_weight * CE(sentiment)``, emotion classes optionally
  weighted by inverse frequency. AdamW (no decay on biases and LayerNorm weights), linear warm-up over
  ``warmup_ratio`` of the steps then linear decay (the Hugging Face fine-tuning recipe).
* Selection: after each epoch the dev split's emotion weighted F1; the best epoch's weights are kept,
  early stopping after ``patience`` epochs without a better one. The only labels it reads outside
  train are dev's, for selection; it never reads test's.
* Reproducible and resumable: seeds and deterministic kernels as ``train``; after every epoch the
  whole state (encoder and heads, optimizer, scheduler, random generators, the best epoch and its
  weights) goes to ``<--resume-dir>/last.pt`` (:class:`pipeline.resume.ResumeCheckpoint`); a killed
  run resumes after its last finished epoch and writes the same bytes as an uninterrupted one.

Output (``--out``, ``models/text_encoder/`` in ``dvc.yaml``), written as a whole
(:func:`pipeline.atomic.atomic_dir`): the best encoder and its tokenizer (``save_pretrained``:
``extract_text`` then loads it from there), ``classifier.safetensors`` (the two heads: the encoder's
own utterance classifier, for comparison with the dialogue model) and ``finetune.json`` (base model
and weights, settings, dev figures per epoch). With ``text.finetune.enabled: false`` only
``finetune.json`` (``{"enabled": false}``) is written and ``extract_text`` uses ``text.model`` as it is.

Run: ``python -m pipeline.finetune_text --prepared data/prepared --out models/text_encoder
--resume-dir data/interim/finetune_text``.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from tqdm import tqdm

from pipeline.atomic import atomic_dir, write_json
from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.encoders import default_device, load_text_encoder
from pipeline.extraction_cache import code_fingerprint
from pipeline.losses import inverse_frequency
from pipeline.resume import ResumeCheckpoint, digest, rng_state, set_rng_state, set_seed
from pipeline.text_features import encoder_inputs, pool_hidden, select_layers, tokenize_inputs
from pipeline.utterances import LABELS_FILE, UTTERANCES_FILE, Utterance, load_labels, load_utterances

log = logging.getLogger(__name__)

INFO_FILE = "finetune.json"
HEADS_FILE = "classifier.safetensors"
SHUFFLE_CHUNK = 32  # training batches are drawn from length-sorted chunks of this many batches (less padding)


class UtteranceClassifier(nn.Module):
    """A text encoder with emotion and sentiment heads on its pooled utterance vector.

    Args:
        encoder: a Hugging Face encoder (``AutoModel``), hidden size ``D``.
        pooling / last_k_layers: as ``text.pooling`` / ``text.last_k_layers``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_emotions: int,
        num_sentiments: int,
        pooling: str,
        last_k_layers: int,
        dropout: float,
    ):
        super().__init__()
        self.encoder = encoder
        self.pooling, self.last_k_layers = pooling, last_k_layers
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.emotion_head = nn.Linear(hidden, num_emotions)
        self.sentiment_head = nn.Linear(hidden, num_sentiments)

    def forward(self, batch: dict, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch``: tokenizer output ``[B, T]``; ``token_mask`` ``[B, T]`` (1 = pooled token).

        Returns:
            (emotion logits ``[B, num_emotions]``, sentiment logits ``[B, num_sentiments]``).
        """
        outputs = self.encoder(**batch, output_hidden_states=self.last_k_layers > 1)
        pooled = pool_hidden(select_layers(outputs, self.last_k_layers), token_mask, self.pooling)  # [B, D]
        pooled = self.dropout(pooled)
        return self.emotion_head(pooled), self.sentiment_head(pooled)


def examples(
    utterances: list[Utterance], labels: dict[str, list[str]], split: str
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The rows of ``split`` with text and known labels: (row indices, emotion ids ``[N]``, sentiment ids ``[N]``)."""
    rows = [
        i
        for i, u in enumerate(utterances)
        if u.split == split
        and u.text.strip()
        and u.emotion in labels["emotions"]
        and u.sentiment in labels["sentiments"]
    ]
    emotion = torch.tensor([labels["emotions"].index(utterances[i].emotion) for i in rows], dtype=torch.long)
    sentiment = torch.tensor([labels["sentiments"].index(utterances[i].sentiment) for i in rows], dtype=torch.long)
    return rows, emotion, sentiment


def training_batches(n: int, lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Positions ``0..n-1`` in batches: shuffled, sorted by length within chunks of ``SHUFFLE_CHUNK``
    batches (similar lengths pad less), the batches shuffled again."""
    order = list(range(n))
    rng.shuffle(order)
    out = []
    for s in range(0, n, batch_size * SHUFFLE_CHUNK):
        chunk = sorted(order[s : s + batch_size * SHUFFLE_CHUNK], key=lambda i: lengths[i])
        out += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def fingerprint(params: Params, utterances: list[Utterance], labels: dict, weights_id: str, device) -> dict[str, str]:
    """What a resume checkpoint of this stage must have been written for: the text settings, the
    train and dev utterances and labels, the base weights, the stage's code, torch and the device type."""
    text = params.text.model_dump(mode="json")
    settings = {k: text[k] for k in ("model", "pooling", "last_k_layers", "context_window", "max_length", "finetune")}
    data = digest(
        json.dumps(labels, sort_keys=True),
        json.dumps(
            [
                [u.utterance_id, u.dialogue_id, u.speaker, u.text, u.emotion, u.sentiment]
                for u in utterances
                if u.split != "test"
            ]
        ),
    )
    return {
        "params": digest(json.dumps(settings, sort_keys=True)).hexdigest()[:16],
        "data": data.hexdigest()[:16],
        "weights": weights_id,
        "code": code_fingerprint("finetune_text"),
        "runtime": f"torch {torch.__version__} on {device.type}",
    }


@torch.inference_mode()
def predict_split(model: UtteranceClassifier, inputs: list, tokenizer, params: Params, device) -> tuple[list, list]:
    """Predicted (emotion ids, sentiment ids) of ``inputs``, in order (eval mode, length-sorted batches)."""
    model.eval()
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][0]) + len(inputs[i][1] or ""))
    emotion, sentiment = [0] * len(inputs), [0] * len(inputs)
    step = params.text.finetune.batch_size * 2
    for s in range(0, len(order), step):
        idx = order[s : s + step]
        batch, token_mask, _ = tokenize_inputs([inputs[i] for i in idx], tokenizer, params.text)
        e, t = model(batch.to(device), token_mask.to(device))
        for k, i in enumerate(idx):
            emotion[i], sentiment[i] = int(e[k].argmax()), int(t[k].argmax())
    return emotion, sentiment


def finetune(
    utterances: list[Utterance], labels: dict[str, list[str]], params: Params, resume_dir: Path
) -> tuple[UtteranceClassifier, object, dict, dict, ResumeCheckpoint]:
    """Fine-tune ``text.model`` on the train utterances, select the epoch on dev.

    Returns:
        (the classifier holding the best epoch's weights, on the CPU; the tokenizer; the encoder info of
        the base model; the history: per epoch ``train_loss``, ``dev_weighted_f1``, ``dev_accuracy``,
        and ``best_epoch``; the resume checkpoint, for the caller to delete once the output is written).

    Raises:
        ValueError: no train or no dev utterance with text and labels.
        OSError: the base model cannot be loaded.
    """
    settings = params.text.finetune
    device = default_device()
    set_seed(settings.seed, device)
    tokenizer, encoder, info = load_text_encoder(params.text.model, device, params.text.revision)
    if params.text.context_window and not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"text.context_window needs a fast tokenizer; {params.text.model} has none")
    inputs = encoder_inputs(utterances, params.text.context_window)
    train_rows, train_emotion, train_sentiment = examples(utterances, labels, "train")
    dev_rows, dev_emotion, dev_sentiment = examples(utterances, labels, "dev")
    if not train_rows or not dev_rows:
        raise ValueError(
            f"finetune_text needs train and dev utterances with text and labels (train {len(train_rows)}, "
            f"dev {len(dev_rows)}); set text.finetune.enabled: false for this dataset"
        )
    torch.manual_seed(settings.seed)  # the heads' initialisation
    model = UtteranceClassifier(
        encoder,
        len(labels["emotions"]),
        len(labels["sentiments"]),
        params.text.pooling,
        params.text.last_k_layers,
        settings.dropout,
    ).to(device)
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n]
    decay = [
        p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n)
    ]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    steps = settings.epochs * -(-len(train_rows) // settings.batch_size)
    warmup = int(settings.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            (step + 1) / max(1, warmup) if step < warmup else max(0.0, (steps - step) / max(1, steps - warmup))
        ),
    )
    class_weights = (
        inverse_frequency(train_emotion, len(labels["emotions"])).to(device)
        if settings.class_weights == "inverse_frequency"
        else None
    )
    rng = random.Random(settings.seed)
    history: dict = {"epochs": [], "best_epoch": None}
    best_score, best_state, bad_epochs, first_epoch = -1.0, None, 0, 1
    resume = ResumeCheckpoint(
        resume_dir, fingerprint(params, utterances, labels, info["weights_id"], device), "finetune_text"
    )
    if resume.state is not None:
        state = resume.state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], rng, device)
        history, best_score, best_state, bad_epochs = (
            state["history"],
            state["best_score"],
            state["best"],
            state["bad_epochs"],
        )
        first_epoch = int(state["epoch"]) + 1
    lengths = [len(inputs[i][0]) + len(inputs[i][1] or "") for i in train_rows]
    for epoch in range(first_epoch, settings.epochs + 1):
        if settings.patience is not None and bad_epochs >= settings.patience:
            break
        start = time.perf_counter()
        model.train()
        total, seen = 0.0, 0
        plan = training_batches(len(train_rows), lengths, settings.batch_size, rng)
        for positions in tqdm(plan, desc=f"finetune_text epoch {epoch}", unit="batch"):
            batch, token_mask, _ = tokenize_inputs([inputs[train_rows[p]] for p in positions], tokenizer, params.text)
            emotion_logits, sentiment_logits = model(batch.to(device), token_mask.to(device))
            loss = nn.functional.cross_entropy(
                emotion_logits, train_emotion[positions].to(device), weight=class_weights
            ) + settings.sentiment_weight * nn.functional.cross_entropy(
                sentiment_logits, train_sentiment[positions].to(device)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(positions)
            seen += len(positions)
        emotion, _ = predict_split(model, [inputs[i] for i in dev_rows], tokenizer, params, device)
        score = float(f1_score(dev_emotion.tolist(), emotion, average="weighted", zero_division=0))
        record = {
            "epoch": epoch,
            "train_loss": round(total / seen, 6),
            "dev_weighted_f1": round(score, 6),
            "dev_accuracy": round(float(accuracy_score(dev_emotion.tolist(), emotion)), 6),
        }
        history["epochs"].append(record)
        if score > best_score:
            best_score, bad_epochs = score, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            history["best_epoch"] = epoch
        else:
            bad_epochs += 1
        log.info(
            "finetune_text epoch %d: train loss %.4f, dev weighted F1 %.4f, accuracy %.4f (%.0f s)%s",
            epoch,
            record["train_loss"],
            record["dev_weighted_f1"],
            record["dev_accuracy"],
            time.perf_counter() - start,
            " best" if history["best_epoch"] == epoch else "",
        )
        resume.save(
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(rng, device),
                "history": copy.deepcopy(history),
                "best_score": best_score,
                "best": best_state,
                "bad_epochs": bad_epochs,
            }
        )
    model.load_state_dict(best_state)
    return model.cpu().eval(), tokenizer, info, history, resume


def run(params: Params, prepared: Path, out: Path, resume_dir: Path) -> None:
    """Run the stage: fine-tune and save into ``out`` (or record that fine-tuning is off).

    Raises:
        FileNotFoundError: ``prepare`` has not run. ValueError: no train or dev utterances. OSError: the
            base model cannot be loaded.
    """
    if not params.text.finetune.enabled:
        with atomic_dir(out) as tmp:
            write_json({"enabled": False}, tmp / INFO_FILE)
        log.info("finetune_text: text.finetune.enabled is false; extract_text uses %s as it is", params.text.model)
        return
    utterances = load_utterances(prepared / UTTERANCES_FILE)
    labels = load_labels(prepared / LABELS_FILE)
    model, tokenizer, info, history, resume = finetune(utterances, labels, params, resume_dir)
    with atomic_dir(out) as tmp:
        model.encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        heads = {f"emotion_head.{k}": v for k, v in model.emotion_head.state_dict().items()}
        heads |= {f"sentiment_head.{k}": v for k, v in model.sentiment_head.state_dict().items()}
        save_file({k: v.contiguous() for k, v in heads.items()}, str(tmp / HEADS_FILE))
        text = params.text.model_dump(mode="json")
        write_json(
            {
                "enabled": True,
                "base_model": params.text.model,
                "base_weights_id": info["weights_id"],
                "base_revision": info.get("revision"),
                "settings": {
                    k: text[k] for k in ("pooling", "last_k_layers", "context_window", "max_length", "finetune")
                },
                "labels": labels,
                **history,
            },
            tmp / INFO_FILE,
        )
    resume.finish()
    best = next(e for e in history["epochs"] if e["epoch"] == history["best_epoch"])
    log.info(
        "finetune_text: best epoch %d of %d (dev weighted F1 %.4f) -> %s",
        history["best_epoch"],
        len(history["epochs"]),
        best["dev_weighted_f1"],
        out,
    )


if __name__ == "__main__":
    run_stage(
        run,
        "Fine-tune the text encoder on the train utterances (text.finetune.*).",
        {
            "prepared": "prepare's output folder (utterances.csv, labels.json)",
            "out": "output folder: the fine-tuned encoder and tokenizer, classifier.safetensors, finetune.json",
            "resume-dir": "per-epoch resume state (no DVC output)",
        },
    )
