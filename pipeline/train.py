"""Stage ``train``: fit the fusion + graph model, keep the epoch with the best dev weighted F1.

Batches are whole dialogues (``train.batch_dialogues`` per step, DGL-batched graphs); AdamW with a
linear warm-up over ``train.warmup_epochs``, then ``train.lr_schedule`` (:class:`LRSchedule`: constant,
cosine decay, or halving on a dev plateau); gradient clipping; the loss of :mod:`pipeline.losses`;
optional early stopping after ``train.patience`` epochs without a better dev weighted F1; optional
mixed precision on CUDA (``train.amp``). Seeds are fixed and deterministic algorithms requested
(:func:`set_seed`), so two CPU runs give the same bytes. Per-epoch train/dev loss, dev weighted F1 /
accuracy and the learning rate go to DVCLive (``metrics/train/``).

Resuming (GPU time gets pre-empted): after every epoch the whole training state (model, optimizer,
scheduler, AMP scaler, every random generator, the best epoch so far and its weights, the early
stopping count, the DVCLive step, summary and files) is written atomically to ``<--resume-dir>/last.pt``
(:class:`pipeline.resume.ResumeCheckpoint`), which is no DVC output. A new run resumes from it after the last finished
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
import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from pipeline import sharding
from pipeline.atomic import atomic_path
from pipeline.cli import run_stage
from pipeline.config import Params, TrainParams
from pipeline.data import Dialogue, batch_plan, collate, load_dialogues
from pipeline.encoders import default_device
from pipeline.extraction_cache import code_fingerprint
from pipeline.graphs import load_graphs, read_index
from pipeline.inference import run_model
from pipeline.losses import ContrastiveQueue, GlobalBatch, batch_loss, emotion_ce_weights, inverse_frequency
from pipeline.modeling import ERCModel
from pipeline.resume import (
    ResumeCheckpoint,
    digest,
    log_nondeterministic_ops,
    rng_state,
    set_rng_state,
    set_seed,
    tensor_bytes,
)
from pipeline.utterances import LABELS_FILE, UTTERANCES_FILE, load_labels, load_utterances

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# mixed precision (seeds, deterministic kernels and the resume checkpoint: pipeline/resume.py)


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
# learning-rate schedule


def cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The lr multiplier of ``train.lr_schedule: cosine`` for optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, then cosine annealing
    (SGDR without restarts, Loshchilov & Hutter 2017) from 1 at ``warmup_steps`` to ``min_ratio`` at
    ``total_steps``: ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2``, ``p = (step - warmup_steps)
    / (total_steps - warmup_steps)`` clipped to 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """The learning rate over training (``train.lr_schedule``), after a linear warm-up over the first
    ``train.warmup_epochs`` epochs (per optimizer step):

    * ``constant``: ``train.lr``;
    * ``cosine``: per step down to ``train.min_lr_ratio * lr`` at the end of the last epoch
      (:func:`cosine_factor`; Loshchilov & Hutter 2017, SGDR without restarts);
    * ``plateau``: torch's ``ReduceLROnPlateau`` on the dev weighted F1 (the model-selection metric),
      stepped once per epoch from the end of the warm-up: the lr is multiplied by
      ``train.plateau_factor`` once ``train.plateau_patience`` epochs in a row bring no better dev
      weighted F1 (as ``train.patience`` counts; torch's ``patience`` is one less), never below
      ``min_lr_ratio * lr``; "better" is strictly greater, as for the best epoch.

    Call :meth:`step` after every optimizer step and :meth:`epoch_end` after every epoch's dev scoring;
    :meth:`state_dict` / :meth:`load_state_dict` carry it through the resume checkpoint.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: TrainParams, steps_per_epoch: int):
        self.kind = params.lr_schedule
        self.warmup_steps = params.warmup_epochs * steps_per_epoch
        total_steps = params.epochs * steps_per_epoch
        if self.kind == "cosine":
            warmup_steps, ratio = self.warmup_steps, params.min_lr_ratio

            def factor(step: int) -> float:
                return cosine_factor(step, warmup_steps, total_steps, ratio)

        else:
            warmup = max(1, self.warmup_steps)

            def factor(step: int) -> float:
                return min(1.0, (step + 1) / warmup)

        self.per_step = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="max",
                factor=params.plateau_factor,
                patience=params.plateau_patience - 1,
                threshold=0.0,
                min_lr=params.min_lr_ratio * params.lr,
            )
            if self.kind == "plateau"
            else None
        )

    def step(self) -> None:
        """After an optimizer step (with ``plateau``, only the warm-up is per step)."""
        if self.plateau is None or self.per_step.last_epoch < self.warmup_steps:
            self.per_step.step()

    def epoch_end(self, dev_weighted_f1: float) -> None:
        """After an epoch's dev scoring: the ``plateau`` step (after the warm-up only); else nothing."""
        if self.plateau is None or self.per_step.last_epoch < self.warmup_steps:
            return
        group = self.plateau.optimizer.param_groups[0]
        before = group["lr"]
        self.plateau.step(float(dev_weighted_f1))
        after = group["lr"]
        if after != before:
            log.info(
                "lr %.2e -> %.2e: no better dev weighted F1 for %d epochs (train.lr_schedule=plateau)",
                before,
                after,
                self.plateau.patience + 1,
            )

    def state_dict(self) -> dict:
        return {
            "per_step": self.per_step.state_dict(),
            "plateau": None if self.plateau is None else self.plateau.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])


# ---------------------------------------------------------------------------------------------
# several processes (DDP without the wrapper: the loss needs the global batch)


class DataParallel:
    """The processes of one ``torchrun`` launch training one model (``runtime.workers > 1``).

    Every process holds the same model and takes the same global batches (the same seeded shuffle);
    process ``r`` runs the model on the ``r``-th contiguous share of each batch's dialogues
    (:meth:`share`), its loss is its share of the one-process loss (:meth:`global_batch`,
    :class:`pipeline.losses.GlobalBatch`: global normalisation, the contrastive loss over the gathered
    batch), and the gradients are summed over processes (:meth:`sum_gradients`) before clipping and
    the optimizer step, so that the parameters follow the one-process run up to float rounding.
    Rank 0 evaluates on dev, logs, checkpoints and writes the model; the dev weighted F1 (and so the
    early-stopping decision) is broadcast (:meth:`broadcast`). Process group: gloo on the CPU, nccl on
    CUDA. One process: every method is the identity.

    This is PyTorch DDP's data flow (Li et al. 2020, "PyTorch Distributed", VLDB) without the
    ``DistributedDataParallel`` wrapper, whose per-process mean loss would change the meaning of the
    batch and of the contrastive loss.
    """

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.rank, self.world, self.device = 0, 1, device
        if sharding.under_torchrun() and sharding.rank_and_world()[1] > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, dialogues: list) -> list:
        """This process's contiguous share of a global batch's dialogues (possibly empty)."""
        if self.world == 1:
            return dialogues
        bounds = np.linspace(0, len(dialogues), self.world + 1).round().astype(int)
        return dialogues[bounds[self.rank] : bounds[self.rank + 1]]

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers to every process (they start equal anyway: same seed)."""
        if self.world > 1:
            import torch.distributed as dist

            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)

    def global_batch(
        self, projections: torch.Tensor, emotion: torch.Tensor, ce_weights: torch.Tensor | None
    ) -> GlobalBatch | None:
        """The :class:`pipeline.losses.GlobalBatch` of this step: every process's projections ``[N_r, P]``
        and labels ``[N_r]`` gathered in batch order (this process's rows live), and the global CE totals."""
        if self.world == 1:
            return None
        import torch.distributed as dist

        # one all_gather for the sizes and CE totals, one for the rows with their labels as a last column
        weights = ce_weights[emotion].sum() if ce_weights is not None else torch.tensor(float(len(emotion)))
        meta = torch.stack([torch.tensor(float(len(emotion))), weights.float().cpu()]).to(self.device)
        metas = [torch.empty_like(meta) for _ in range(self.world)]
        dist.all_gather(metas, meta)
        sizes = [int(m[0]) for m in metas]
        rows = torch.cat([projections.detach(), emotion[:, None].to(projections.dtype)], dim=1)  # [N_r, P + 1]
        rows = torch.cat([rows, rows.new_zeros(max(sizes) - len(emotion), rows.shape[1])])
        gathered = [torch.empty_like(rows) for _ in range(self.world)]
        dist.all_gather(gathered, rows)
        parts = [projections if r == self.rank else gathered[r][: sizes[r], :-1] for r in range(self.world)]
        labels = [gathered[r][: sizes[r], -1].long() for r in range(self.world)]
        return GlobalBatch(torch.cat(parts), torch.cat(labels), float(sum(m[1] for m in metas)), sum(sizes))

    def sum_gradients(self, model: torch.nn.Module) -> None:
        """Sum every parameter's gradient over the processes (a missing gradient counts as zeros)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        params = list(model.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective per step, not one per tensor
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))

    def sum_each(self, values: list[float]) -> list[float]:
        """The element-wise sum of a list of floats over the processes."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def broadcast(self, value: float) -> float:
        """Rank 0's value of a float, on every process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.broadcast(box, src=0)
        return float(box)


# ---------------------------------------------------------------------------------------------
# resuming


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
    data = digest(json.dumps(encoders or {}, sort_keys=True, default=str))
    for split in ("train", "dev"):
        for d in splits.get(split, []):
            data.update(digest(split, d.dialogue_id, json.dumps(d.utterance_ids)).digest())
            for m in sorted(d.features):
                data.update(tensor_bytes(d.features[m]) + tensor_bytes(d.masks[m]))
            src, dst = d.graph.edges()
            for t in (d.emotion, d.sentiment, src, dst, d.graph.edata["rel_type"]):
                data.update(tensor_bytes(t))
    return {
        "params": digest(json.dumps(sections, sort_keys=True)).hexdigest()[:16],
        "labels": digest(
            json.dumps({"labels": labels, "input_sizes": input_sizes, "num_relations": num_relations}, sort_keys=True)
        ).hexdigest()[:16],
        "data": data.hexdigest()[:16],
        "code": code_fingerprint("train"),
        "runtime": f"torch {torch.__version__} on {device.type}"
        + (f" x {sharding.rank_and_world()[1]} processes" if sharding.under_torchrun() else ""),
    }


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
    relation_speakers: int | None = None,
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
        relation_speakers: the speaker count ``M`` the graphs' ``speaker_pair`` relations were built for
            (:func:`pipeline.graphs.read_index`), recorded for predict, which builds graphs itself;
            None: ``same_other``, or unknown (``graph.max_speakers`` then).

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
    parallel = DataParallel(device)
    if parallel.world > 1 and params.loss.contrastive_queue:
        raise ValueError("loss.contrastive_queue is not supported with runtime.workers > 1; set one of them off")
    log.info(
        "train: %d train and %d dev dialogues on %s%s%s",
        len(splits["train"]),
        len(splits["dev"]),
        device,
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "",
        f", process {parallel.rank} of {parallel.world}" if parallel.world > 1 else "",
    )
    example = splits["train"][0]
    input_sizes = {m: int(f.shape[1]) for m, f in example.features.items()}
    emotions, sentiments = list(labels["emotions"]), list(labels["sentiments"])
    with log_nondeterministic_ops():
        model = ERCModel(input_sizes, len(emotions), len(sentiments), num_relations, params.model, device=device).to(
            device
        )
        parallel.broadcast_parameters(model)
        class_weights = inverse_frequency(torch.cat([d.emotion for d in splits["train"]]), len(emotions)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay)
        steps_per_epoch = -(-len(splits["train"]) // params.train.batch_dialogues)
        scheduler = LRSchedule(optimizer, params.train, steps_per_epoch)
        amp_dtype, scaler = _amp_settings(params.train.amp, device)
        rng = random.Random(params.train.seed)
        queue = ContrastiveQueue(params.loss.contrastive_queue) if params.loss.contrastive_queue else None
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
            set_rng_state(state["rng"], rng, device)
            if queue is not None:
                queue.load_state_dict(state["queue"])
            if live is not None and state.get("live") is not None:
                _restore_live(live, state["live"])
        for epoch in range(epochs_run, params.train.epochs):
            if stopped:
                break
            start = time.perf_counter()
            model.train()
            train_losses, ce_shares = [], []
            for global_dialogues in batch_plan(splits["train"], params.train.batch_dialogues, rng):
                autocast = (
                    torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
                )
                optimizer.zero_grad()
                mine = parallel.share(global_dialogues)
                with autocast:
                    if mine:
                        batch = collate(mine).to(device)
                        result = model(batch)
                        projections, emotion = result.projections, batch.emotion
                    else:  # fewer dialogues than processes in the last batch: nothing to run here
                        projections = torch.zeros(0, params.model.hidden_size, device=device)
                        emotion = torch.zeros(0, dtype=torch.long, device=device)
                    ce_weights = emotion_ce_weights(params.loss, class_weights)
                    shared = parallel.global_batch(projections, emotion, ce_weights)
                    if mine:
                        loss, parts = batch_loss(result, batch, params.loss, class_weights, queue, shared)
                    else:
                        loss, parts = None, {"emotion": 0.0, "sentiment": 0.0, "contrastive": 0.0}
                if loss is not None and loss.requires_grad:
                    if scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                parallel.sum_gradients(model)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                if shared is None:
                    train_losses.append(loss.item())
                else:  # this process's cross-entropy share; the contrastive term is global (the same everywhere)
                    ce_shares.append(parts["emotion"] + params.loss.sentiment_weight * parts["sentiment"])
                    train_losses.append(params.loss.contrastive_weight * parts["contrastive"])
            if ce_shares:  # the batch losses: the processes' shares summed (one collective per epoch)
                train_losses = [c + t for c, t in zip(parallel.sum_each(ce_shares), train_losses)]
            lr = optimizer.param_groups[0]["lr"]  # after the epoch's last step (before a plateau step)
            if parallel.is_main:
                dev = run_model(model, splits["dev"], params, device, class_weights)
                dev_pred = dev["emotion_prob"].argmax(-1)
                dev_f1 = f1_score(dev["emotion"], dev_pred, average="weighted", zero_division=0)
                dev_acc = accuracy_score(dev["emotion"], dev_pred)
            else:
                dev, dev_acc = {"loss": float("nan")}, float("nan")
            dev_f1 = parallel.broadcast(float(dev_f1) if parallel.is_main else 0.0)  # the same decisions everywhere
            scheduler.epoch_end(dev_f1)  # plateau: the next epoch's lr
            (log.info if parallel.is_main else log.debug)(
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
            if dev_f1 > best["dev_weighted_f1"] and not parallel.is_main:
                best, since_best = {"dev_weighted_f1": float(dev_f1)}, 0  # rank 0 keeps the weights
            elif dev_f1 > best["dev_weighted_f1"]:
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
                    (log.info if parallel.is_main else log.debug)(
                        "early stopping: no better dev weighted F1 for %d epochs", params.train.patience
                    )
                    stopped = True
            if resume is not None and parallel.is_main:
                resume.save(
                    {
                        "epoch": epochs_run,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": rng_state(rng, device),
                        "queue": queue.state_dict() if queue is not None else None,
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
    if parallel.world > 1:
        sharding.close_process_group()
    if not parallel.is_main:
        return {}  # rank 0 holds the best weights and writes the checkpoint
    return {
        "state_dict": best["state_dict"],
        "model": params.model.model_dump(),
        "modalities": list(model.modalities),  # = model.modalities: the features the model reads
        "fusion": model.fusion_used,  # the fusion that ran (model.fusion, or its single-modality fallback)
        "input_sizes": input_sizes,
        "emotions": emotions,
        "sentiments": sentiments,
        "num_relations": num_relations,
        # M of the speaker_pair relation types (pipeline.graphs): predict builds its graphs with it
        "relation_speakers": relation_speakers,
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
    index = read_index(graphs)
    # graphs built before the index recorded M used graph.max_speakers
    relation_speakers = (
        index.get("relation_speakers", params.graph.max_speakers) if index.get("relations") == "speaker_pair" else None
    )
    splits, encoders = load_dialogues(
        labels["emotions"], labels["sentiments"], load_utterances(prepared / UTTERANCES_FILE), features, graph_table
    )
    resume = ResumeCheckpoint(resume_dir, run_fingerprint(params, splits, num_relations, labels, encoders))
    if sharding.rank_and_world()[0] > 0:  # another DDP process: rank 0 logs, checkpoints and writes the model
        train(params, splits, num_relations, labels, encoders, None, resume, on_epoch_end, relation_speakers)
        return
    with Live(str(metrics), resume=resume.resuming, dvcyaml=None, save_dvc_exp=False, report=None) as live:
        checkpoint = train(
            params, splits, num_relations, labels, encoders, live, resume, on_epoch_end, relation_speakers
        )
        live.summary.update(
            {
                "best_epoch": checkpoint["best_epoch"],
                "best_dev_weighted_f1": checkpoint["best_dev_weighted_f1"],
                "best_dev_accuracy": checkpoint["best_dev_accuracy"],
                "lr_configured": params.train.lr,
                "graph_backend": checkpoint["graph_backend"],
                "modalities": checkpoint["modalities"],
                "fusion": checkpoint["fusion"],
                "num_relations": num_relations,
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
        distributed="ddp",
    )
