"""Stage ``train``: fit the fusion + graph model, keep the epoch with the best dev weighted F1.

Batches are whole dialogues (``train.batch_dialogues`` per step, DGL-batched graphs); AdamW with a
linear warm-up over ``train.warmup_epochs``, then the constant ``train.lr``; gradient clipping; the
loss of :mod:`pipeline.losses`; optional early stopping after ``train.patience`` epochs without a
better dev weighted F1; optional mixed precision on CUDA (``train.amp``). Seeds are fixed and
deterministic algorithms requested (:func:`set_seed`), so two CPU runs give the same bytes. Per-epoch
train/dev loss, dev weighted F1 / accuracy and the learning rate go to DVCLive (``metrics/train/``).

Resuming (GPU time gets pre-empted): after every epoch the whole training state (model, optimizer,
scheduler, AMP scaler, every random generator, the best epoch so far and its weights, the early
stopping count, the DVCLive step, summary and files) is written atomically to ``<--resume-dir>/last.pt``
(:class:`ResumeCheckpoint`), which is no DVC output. A new run resumes from it after the last finished
epoch when it was written for the same run (:func:`run_fingerprint`: ``model.*``, ``loss.*``,
``train.*``, the labels, input sizes and the content of every feature, mask, label and graph that
training reads, the stage's code, the torch version and the device type); otherwise it starts fresh
and says why. A killed and resumed run writes the same ``model.pt`` bytes and the same DVCLive files
as an uninterrupted one (on the CPU). ``last.pt`` is deleted once ``model.pt`` is written.

Output: the checkpoint ``--model`` (``models/model.pt``: best-dev state dict, the model/label/feature
settings it needs, the encoders its features came from), written once at the end, and DVCLive metrics
in ``--metrics``. Run: the ``train`` command in ``dvc.yaml`` (``python -m pipeline.train --help``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from pipeline.atomic import atomic_path
from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.data import Dialogue, batches, load_dialogues
from pipeline.encoders import default_device
from pipeline.extraction_cache import code_fingerprint
from pipeline.graphs import load_graphs
from pipeline.inference import run_model
from pipeline.losses import batch_loss, inverse_frequency
from pipeline.modeling import ERCModel
from pipeline.utterances import LABELS_FILE, UTTERANCES_FILE, load_labels, load_utterances

log = logging.getLogger(__name__)

RESUME_FILE = "last.pt"
# cuBLAS needs a fixed workspace for reproducible results (CUDA >= 10.2): one of these two values.
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")
# What torch says (warn_only=True) for an op that has no deterministic kernel.
_NONDETERMINISTIC = re.compile(r"^\s*(?P<op>\S+?)\s+does not have a deterministic implementation")


# ---------------------------------------------------------------------------------------------
# seeds and deterministic kernels


def set_seed(seed: int, device: torch.device | str | None = None) -> None:
    """Seed Python, NumPy and torch (every CUDA device too), and ask torch for deterministic algorithms.

    On CUDA (``device``, default :func:`default_device`) also set ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
    unless it already holds a deterministic value. cuBLAS reads it once, at its first call in the
    process, so this must run before any CUDA matrix product (the train stage's process makes none
    before). cuDNN's autotuner is switched off (it may pick another kernel per run). Ops without a
    deterministic kernel only warn (``warn_only=True``); :func:`log_nondeterministic_ops` logs them.
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        if current not in CUBLAS_DETERMINISTIC:
            if current is not None:
                log.warning("CUBLAS_WORKSPACE_CONFIG=%s is not deterministic; using :4096:8", current)
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device as well
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def log_nondeterministic_ops() -> Iterator[set[str]]:
    """Turn torch's warnings about ops without a deterministic (CUDA) kernel into one log line per op.

    Yields the set of such ops seen so far. Other warnings are shown as usual.
    """
    seen: set[str] = set()
    with warnings.catch_warnings():  # restores the filters and warnings.showwarning on exit
        warnings.filterwarnings("always", message=r".*does not have a deterministic implementation")
        warnings.filterwarnings("always", message=r".*CUBLAS_WORKSPACE_CONFIG")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            match = _NONDETERMINISTIC.match(text)
            if match:
                op = match.group("op")
                if op not in seen:
                    seen.add(op)
                    log.warning(
                        "op %s has no deterministic CUDA kernel: results may differ run to run in the last digits", op
                    )
                return
            if "CUBLAS_WORKSPACE_CONFIG" in text:
                if "cublas" not in seen:
                    seen.add("cublas")
                    log.warning(
                        "cuBLAS started before CUBLAS_WORKSPACE_CONFIG was set (something used CUDA "
                        "matrix products before training): results may differ run to run in the last "
                        "digits; run the stage in a fresh process"
                    )
                return
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield seen


def _amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """The autocast dtype and the gradient scaler for ``train.amp`` on ``device`` (None, None: float32)."""
    if amp == "none":
        return None, None
    if device.type != "cuda":
        log.info("train.amp=%s ignored on the %s (autocast on CUDA only): training in float32", amp, device.type)
        return None, None
    dtype = getattr(torch, amp)
    log.info(
        "train.amp=%s: training steps under CUDA autocast%s",
        amp,
        ", gradients scaled (GradScaler)" if dtype is torch.float16 else "",
    )
    return dtype, torch.amp.GradScaler("cuda") if dtype is torch.float16 else None


# ---------------------------------------------------------------------------------------------
# resuming


def _digest(*chunks: bytes | str) -> hashlib._Hash:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk.encode() if isinstance(chunk, str) else chunk)
        digest.update(b"\0")
    return digest


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}{tuple(t.shape)}".encode() + t.numpy().tobytes()


def run_fingerprint(
    params: Params,
    splits: dict[str, list[Dialogue]],
    num_relations: int,
    labels: dict[str, list[str]],
    encoders: dict | None = None,
    device: torch.device | None = None,
) -> dict[str, str]:
    """What a resume checkpoint must have been written for, in named parts (hashes).

    ``params``: ``model.*``, ``loss.*``, ``train.*``; ``labels``: the class lists, input sizes and relation
    count; ``data``: every feature, mask, label and graph edge of the train and dev dialogues, and the
    encoder info of the feature files (the content training reads, not file dates); ``code``: the
    source of the train stage's ``pipeline/`` dependencies in ``dvc.yaml``; ``runtime``: torch version
    and device type (a run is not continued on another kind of device).
    """
    device = device if device is not None else default_device()
    sections = {name: getattr(params, name).model_dump(mode="json") for name in ("model", "loss", "train")}
    input_sizes = {m: int(f.shape[1]) for m, f in splits["train"][0].features.items()} if splits.get("train") else {}
    data = _digest(json.dumps(encoders or {}, sort_keys=True, default=str))
    for split in ("train", "dev"):
        for d in splits.get(split, []):
            data.update(_digest(split, d.dialogue_id, json.dumps(d.utterance_ids)).digest())
            for m in sorted(d.features):
                data.update(_tensor_bytes(d.features[m]) + _tensor_bytes(d.masks[m]))
            src, dst = d.graph.edges()
            for t in (d.emotion, d.sentiment, src, dst, d.graph.edata["rel_type"]):
                data.update(_tensor_bytes(t))
    return {
        "params": _digest(json.dumps(sections, sort_keys=True)).hexdigest()[:16],
        "labels": _digest(
            json.dumps({"labels": labels, "input_sizes": input_sizes, "num_relations": num_relations}, sort_keys=True)
        ).hexdigest()[:16],
        "data": data.hexdigest()[:16],
        "code": code_fingerprint("train"),
        "runtime": f"torch {torch.__version__} on {device.type}",
    }


class ResumeCheckpoint:
    """The resume checkpoint of one training run: ``<directory>/last.pt``.

    Opening it loads ``last.pt`` when it exists and was written for ``fingerprint``
    (:func:`run_fingerprint`); a stale or unreadable one is deleted. Either way the log says which
    and why. :meth:`save` writes it atomically (a kill mid-write leaves the previous one); :meth:`finish`
    deletes it once the run's outputs are written.
    """

    def __init__(self, directory: str | Path, fingerprint: dict[str, str]):
        self.path = Path(directory) / RESUME_FILE
        self.fingerprint = dict(fingerprint)
        self.state: dict | None = self._load()

    @property
    def resuming(self) -> bool:
        return self.state is not None

    def _discard(self, why: str) -> None:
        log.warning("train: starting fresh: %s %s; deleted", self.path, why)
        self.path.unlink(missing_ok=True)

    def _load(self) -> dict | None:
        if not self.path.exists():
            log.info("train: starting fresh (no resume checkpoint %s)", self.path)
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            written_for = dict(state["fingerprint"])
            epoch = int(state["epoch"])
        except Exception as err:  # noqa: BLE001 - any unreadable file means: start over
            self._discard(f"cannot be read ({type(err).__name__}: {err})")
            return None
        differ = [
            k for k in sorted(set(written_for) | set(self.fingerprint)) if written_for.get(k) != self.fingerprint.get(k)
        ]
        if differ:
            details = "; ".join(f"{k}: {written_for.get(k)} there, {self.fingerprint.get(k)} now" for k in differ)
            self._discard(f"was written for another run ({details})")
            return None
        log.info(
            "train: resuming after epoch %d from %s (written for the same params, inputs and code)", epoch, self.path
        )
        return state

    def save(self, state: dict) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            torch.save({**state, "fingerprint": self.fingerprint}, f)

    def finish(self) -> None:
        """Delete ``last.pt`` (and its folder when that is left empty)."""
        self.path.unlink(missing_ok=True)
        self.state = None
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()


def _rng_state(shuffle: random.Random, device: torch.device) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "shuffle": shuffle.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict, shuffle: random.Random, device: torch.device) -> None:
    random.setstate(state["python"])
    shuffle.setstate(state["shuffle"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _live_files(live) -> dict[str, str]:
    """The files DVCLive has written for the metrics so far (summary and per-step .tsv), by relative path."""
    root = Path(live.dir)
    files = [Path(live.metrics_file), *sorted((Path(live.plots_dir) / "metrics").rglob("*.tsv"))]
    out = {}
    for path in files:
        if path.is_file():
            with open(path, encoding="utf-8", newline="") as f:  # the line ends as written
                out[path.relative_to(root).as_posix()] = f.read()
    return out


def _restore_live(live, saved: dict) -> None:
    """Put DVCLive back where the checkpoint left it: its files as they were then, its step and summary.

    Needed beyond ``Live(resume=True)``: ``dvc repro`` deletes the stage's outputs (the metrics folder)
    before running it; DVCLive's own resume takes the step from ``metrics.json`` (``step`` 0 is read as
    "no step yet", so a resume after the first epoch would log it twice) and keeps rows that a killed
    epoch appended after the checkpoint was written.
    """
    root = Path(live.dir)
    for stale in (Path(live.plots_dir) / "metrics").rglob("*.tsv"):
        stale.unlink()
    for rel, text in saved["files"].items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    live.step = saved["step"]
    live.summary = copy.deepcopy(saved["summary"])


# ---------------------------------------------------------------------------------------------
# training


def train(
    params: Params,
    splits: dict[str, list[Dialogue]],
    num_relations: int,
    labels: dict[str, list[str]],
    encoders: dict | None = None,
    live=None,
    resume: ResumeCheckpoint | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> dict:
    """Train on ``splits["train"]``, select on ``splits["dev"]`` by emotion weighted F1.

    Args:
        splits: ``{"train": [...], "dev": [...]}`` dialogues (see :func:`pipeline.data.load_dialogues`).
        num_relations: relation types of the dialogue graphs.
        labels: ``{"emotions": [...], "sentiments": [...]}``, the classes in output order
            (:func:`pipeline.utterances.load_labels`).
        encoders: which encoders produced the features (stored in the checkpoint).
        live: a ``dvclive.Live`` to log per-epoch metrics to, or None; when resuming, open it with
            ``resume=True`` (:attr:`ResumeCheckpoint.resuming`).
        resume: where to save the training state after each epoch; when it holds a state, training
            continues after that state's epoch.
        on_epoch_end: called with the 1-based epoch number after each epoch (after the resume
            checkpoint is saved).

    Returns:
        the checkpoint dict (best-dev state dict and everything :func:`build_model` needs).

    Raises:
        ValueError: the train or dev split is empty.
    """
    for split in ("train", "dev"):
        if not splits.get(split):
            raise ValueError(f"the {split} split has no dialogues; check data.root and the prepare report")
    device = default_device()
    set_seed(params.train.seed, device)
    log.info(
        "train: %d train and %d dev dialogues on %s%s",
        len(splits["train"]),
        len(splits["dev"]),
        device,
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "",
    )
    example = splits["train"][0]
    input_sizes = {m: int(f.shape[1]) for m, f in example.features.items()}
    emotions, sentiments = list(labels["emotions"]), list(labels["sentiments"])
    with log_nondeterministic_ops():
        model = ERCModel(input_sizes, len(emotions), len(sentiments), num_relations, params.model, device=device).to(
            device
        )
        class_weights = inverse_frequency(torch.cat([d.emotion for d in splits["train"]]), len(emotions)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay)
        steps_per_epoch = -(-len(splits["train"]) // params.train.batch_dialogues)
        warmup = max(1, params.train.warmup_epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        amp_dtype, scaler = _amp_settings(params.train.amp, device)
        rng = random.Random(params.train.seed)
        best = {"dev_weighted_f1": -1.0}
        epochs_run, since_best, stopped = 0, 0, False
        if resume is not None and resume.state is not None:
            state = resume.state
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler") is not None:
                scaler.load_state_dict(state["scaler"])
            best = dict(state["best"])
            epochs_run, since_best, stopped = int(state["epoch"]), int(state["since_best"]), bool(state["stopped"])
            _set_rng_state(state["rng"], rng, device)
            if live is not None and state.get("live") is not None:
                _restore_live(live, state["live"])
        for epoch in range(epochs_run, params.train.epochs):
            if stopped:
                break
            start = time.perf_counter()
            model.train()
            train_losses = []
            for batch in batches(splits["train"], params.train.batch_dialogues, shuffle=True, rng=rng):
                batch = batch.to(device)
                autocast = (
                    torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
                )
                with autocast:
                    result = model(batch)
                    loss, _ = batch_loss(result, batch, params.loss, class_weights)
                optimizer.zero_grad()
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                train_losses.append(loss.item())
            lr = optimizer.param_groups[0]["lr"]
            dev = run_model(model, splits["dev"], params, device, class_weights)
            dev_pred = dev["emotion_prob"].argmax(-1)
            dev_f1 = f1_score(dev["emotion"], dev_pred, average="weighted", zero_division=0)
            dev_acc = accuracy_score(dev["emotion"], dev_pred)
            log.info(
                "epoch %3d  train loss %.4f  dev loss %.4f  dev weighted F1 %.4f  acc %.4f  lr %.2e  (%.1f s)",
                epoch + 1,
                np.mean(train_losses),
                dev["loss"],
                dev_f1,
                dev_acc,
                lr,
                time.perf_counter() - start,
            )
            if live is not None:
                live.log_metric("train/loss", float(np.mean(train_losses)))
                live.log_metric("dev/loss", dev["loss"])
                live.log_metric("dev/weighted_f1", float(dev_f1))
                live.log_metric("dev/accuracy", float(dev_acc))
                live.log_metric("lr", lr)
                live.next_step()
            epochs_run = epoch + 1
            if dev_f1 > best["dev_weighted_f1"]:
                state_dict = copy.deepcopy(model.state_dict())
                for key, value in state_dict.items():  # the checkpoint holds CPU tensors, whatever the device
                    state_dict[key] = value.cpu()
                best = {
                    "dev_weighted_f1": float(dev_f1),
                    "dev_accuracy": float(dev_acc),
                    "epoch": epoch + 1,
                    "state_dict": state_dict,
                }
                since_best = 0
            else:
                since_best += 1
                if params.train.patience is not None and since_best >= params.train.patience:
                    log.info("early stopping: no better dev weighted F1 for %d epochs", params.train.patience)
                    stopped = True
            if resume is not None:
                resume.save(
                    {
                        "epoch": epochs_run,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": _rng_state(rng, device),
                        "best": best,
                        "since_best": since_best,
                        "stopped": stopped,
                        "live": None
                        if live is None
                        else {"step": live.step, "summary": copy.deepcopy(live.summary), "files": _live_files(live)},
                    }
                )
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    return {
        "state_dict": best["state_dict"],
        "model": params.model.model_dump(),
        "input_sizes": input_sizes,
        "emotions": emotions,
        "sentiments": sentiments,
        "num_relations": num_relations,
        "encoders": encoders or {},
        "lr": params.train.lr,
        # the settings the features (as their files record them) and graphs were made with:
        # predict refuses to run with other ones
        "feature_params": {
            **{m: (encoders or {}).get(m, {}).get("params") for m in ("text", "audio", "visual")},
            "graph": params.graph.model_dump(mode="json"),
        },
        "best_epoch": best["epoch"],
        "best_dev_weighted_f1": best["dev_weighted_f1"],
        "best_dev_accuracy": best["dev_accuracy"],
        "epochs_run": epochs_run,
        "graph_backend": model.graph_backend_used,  # the kernels that ran (model.graph_backend: auto resolves)
    }


def run(
    params: Params,
    prepared: Path,
    features: Path,
    graphs: Path,
    model: Path,
    metrics: Path,
    resume_dir: Path,
    on_epoch_end: Callable[[int], None] | None = None,
) -> None:
    """Train on the outputs of the upstream stages, save the best checkpoint to ``model``, log the
    curves and a summary with DVCLive into ``metrics``; resume from ``resume_dir/last.pt`` when it
    belongs to this run (see the module docstring), delete it at the end."""
    from dvclive import Live

    labels = load_labels(prepared / LABELS_FILE)
    graph_table, num_relations = load_graphs(graphs)
    splits, encoders = load_dialogues(
        labels["emotions"], labels["sentiments"], load_utterances(prepared / UTTERANCES_FILE), features, graph_table
    )
    resume = ResumeCheckpoint(resume_dir, run_fingerprint(params, splits, num_relations, labels, encoders))
    with Live(str(metrics), resume=resume.resuming, dvcyaml=None, save_dvc_exp=False, report=None) as live:
        checkpoint = train(params, splits, num_relations, labels, encoders, live, resume, on_epoch_end)
        live.summary.update(
            {
                "best_epoch": checkpoint["best_epoch"],
                "best_dev_weighted_f1": checkpoint["best_dev_weighted_f1"],
                "best_dev_accuracy": checkpoint["best_dev_accuracy"],
                "lr_configured": params.train.lr,
                "graph_backend": checkpoint["graph_backend"],
            }
        )
        with atomic_path(model) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)  # a file object: the archive's inner name does not depend on tmp's
    resume.finish()
    log.info(
        "train: best dev weighted F1 %.4f at epoch %d -> %s",
        checkpoint["best_dev_weighted_f1"],
        checkpoint["best_epoch"],
        model,
    )


if __name__ == "__main__":
    run_stage(
        run,
        "Train the fusion + graph model (model.*, loss.*, train.*); resumable after a kill.",
        {
            "prepared": "prepare's output folder (utterances.csv, labels.json)",
            "features": "folder of text/audio/visual.safetensors",
            "graphs": "build_graphs' output folder",
            "model": "output checkpoint (best dev weighted F1)",
            "metrics": "DVCLive folder for the metrics",
            "resume-dir": "folder for the resume checkpoint last.pt (not a DVC output: it must survive a "
            "killed run; deleted at the end)",
        },
    )
