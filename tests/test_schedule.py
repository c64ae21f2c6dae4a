"""train.lr_schedule: linear warm-up, then constant, cosine decay (Loshchilov & Hutter 2017) or halving on a
dev plateau (ReduceLROnPlateau); the per-epoch lr the train loop logs. Resume: tests/test_train_resume.py."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from test_model import LABELS, make_dialogues, small_params

from pipeline.config import ParamsError, parse_params
from pipeline.graphs import num_relations
from pipeline.train import LRSchedule, train

LR = 3e-3
STEPS = 4  # 8 train dialogues, 2 a batch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RecordingLive:
    """What train() uses of a dvclive.Live when not resuming: log_metric and next_step."""

    def __init__(self):
        self.rows: list[dict[str, float]] = [{}]

    def log_metric(self, name: str, value: float) -> None:
        self.rows[-1][name] = value

    def next_step(self) -> None:
        self.rows.append({})

    def series(self, name: str) -> list[float]:
        return [row[name] for row in self.rows if name in row]


def schedule(kind: str, epochs: int, warmup: int, **train) -> tuple[LRSchedule, torch.optim.Optimizer]:
    params = parse_params(
        {"train": {"lr": LR, "epochs": epochs, "warmup_epochs": warmup, "lr_schedule": kind, **train}}
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    return LRSchedule(optimizer, params.train, STEPS), optimizer


def advance(sched: LRSchedule, optimizer: torch.optim.Optimizer) -> None:
    """One training step: the optimizer's, then the schedule's (as train does)."""
    optimizer.step()
    sched.step()


def expected_cosine(step: int, warmup_steps: int, total_steps: int, ratio: float) -> float:
    """The lr of optimizer step ``step`` (0-based), written out independently of pipeline.train."""
    if step < warmup_steps:
        return LR * (step + 1) / warmup_steps
    t = (step - warmup_steps) / (total_steps - warmup_steps)
    return LR * ratio + (LR - LR * ratio) * (1 + math.cos(math.pi * t)) / 2


def test_params_defaults_and_validation():
    train = parse_params({}).train
    assert (train.lr_schedule, train.min_lr_ratio, train.plateau_factor, train.plateau_patience) == (
        "constant",
        0.01,
        0.5,
        2,
    )
    for raw, key in (
        ({"lr_schedule": "linear"}, "train.lr_schedule"),
        ({"plateau_factor": 1.0}, "train.plateau_factor"),
        ({"plateau_patience": 0}, "train.plateau_patience"),
        ({"min_lr_ratio": 1.5}, "train.min_lr_ratio"),
    ):
        with pytest.raises(ParamsError, match=key):
            parse_params({"train": raw})


def test_cosine_per_step_follows_the_formula_down_to_the_floor():
    sched, optimizer = schedule("cosine", epochs=10, warmup=2, min_lr_ratio=0.01)
    lrs = []
    for _ in range(10 * STEPS):
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr this step runs with
        advance(sched, optimizer)
    want = [expected_cosine(s, 2 * STEPS, 10 * STEPS, 0.01) for s in range(10 * STEPS)]
    assert lrs == pytest.approx(want, rel=1e-12)
    assert max(lrs) == pytest.approx(LR) and lrs[2 * STEPS] == pytest.approx(LR)  # peak right after warm-up
    assert all(a >= b for a, b in zip(lrs[2 * STEPS :], lrs[2 * STEPS + 1 :]))  # then only down
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * LR)  # after the last step: the floor


def test_cosine_without_warm_up_starts_at_lr():
    sched, optimizer = schedule("cosine", epochs=3, warmup=0, min_lr_ratio=0.0)
    assert optimizer.param_groups[0]["lr"] == LR
    for _ in range(3 * STEPS):
        advance(sched, optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


def test_training_logs_the_cosine_decay_per_epoch():
    params = small_params(
        **{"train.epochs": 10, "train.warmup_epochs": 2, "train.lr_schedule": "cosine", "train.min_lr_ratio": 0.01}
    )
    splits = {"train": make_dialogues(8, seed=4, params=params), "dev": make_dialogues(3, seed=5, params=params)}
    live = RecordingLive()
    train(params, splits, num_relations(params.graph), LABELS, live=live)
    logged = live.series("lr")  # after each epoch's last step, i.e. after step e * STEPS
    want = [expected_cosine(e * STEPS, 2 * STEPS, 10 * STEPS, 0.01) for e in range(1, 10)] + [0.01 * LR]
    assert logged == pytest.approx(want, rel=1e-9)
    assert logged[1] == pytest.approx(LR) and logged[-1] == pytest.approx(0.01 * LR)


def test_constant_stays_at_lr_after_the_warm_up():
    sched, optimizer = schedule("constant", epochs=5, warmup=2)
    lrs = []
    for _ in range(5 * STEPS):
        advance(sched, optimizer)
        sched.epoch_end(0.0)  # does nothing for constant
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[: 2 * STEPS - 1] == pytest.approx([LR * (s + 2) / (2 * STEPS) for s in range(2 * STEPS - 1)])
    assert lrs[2 * STEPS - 1 :] == [LR] * (3 * STEPS + 1)


def run_epochs(sched: LRSchedule, optimizer, dev_f1: list[float]) -> list[float]:
    """The lr each epoch trains with (at its end), for a sequence of dev weighted F1 values."""
    lrs = []
    for f1 in dev_f1:
        for _ in range(STEPS):
            advance(sched, optimizer)
        lrs.append(optimizer.param_groups[0]["lr"])
        sched.epoch_end(f1)
    return lrs


def test_plateau_halves_after_patience_epochs_without_a_better_dev_f1(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.train")
    sched, optimizer = schedule("plateau", epochs=12, warmup=0, plateau_patience=2, min_lr_ratio=0.2)
    f1 = [0.50, 0.60, 0.60, 0.55, 0.70, 0.65, 0.70, 0.71, 0.70, 0.70, 0.70, 0.70]
    # epoch: 1 best, 2 better, 3 no (equal), 4 no: halved for epoch 5; 5 better, 6 no, 7 no (equal): halved
    # for 8; 8 better, 9 no, 10 no: halved to LR / 8, below the floor 0.2 * LR: the floor; 11, 12 no: stays
    lrs = run_epochs(sched, optimizer, f1)
    assert lrs == pytest.approx([LR] * 4 + [LR / 2] * 3 + [LR / 4] * 3 + [0.2 * LR] * 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * LR)
    assert "no better dev weighted F1 for 2 epochs" in caplog.text
    # an equal F1 is no improvement (as for the best epoch): patience 1 halves after one equal epoch
    sched, optimizer = schedule("plateau", epochs=3, warmup=0, plateau_patience=1)
    assert run_epochs(sched, optimizer, [0.5, 0.5, 0.5]) == pytest.approx([LR, LR, LR / 2])


def test_plateau_starts_counting_after_the_warm_up():
    sched, optimizer = schedule("plateau", epochs=6, warmup=2, plateau_patience=1)
    # falling dev F1 throughout: no change during the warm-up, then halved after each bad epoch
    lrs = run_epochs(sched, optimizer, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert lrs == pytest.approx([LR * (STEPS + 1) / (2 * STEPS), LR, LR, LR / 2, LR / 4, LR / 8])


def test_training_with_plateau_logs_the_halving():
    params = small_params(
        **{"train.epochs": 8, "train.warmup_epochs": 1, "train.lr_schedule": "plateau", "train.plateau_patience": 1}
    )
    splits = {
        "train": make_dialogues(8, seed=4, params=params, learnable=False),
        "dev": make_dialogues(3, seed=5, params=params, learnable=False),
    }
    live = RecordingLive()
    train(params, splits, num_relations(params.graph), LABELS, live=live)
    lrs, f1 = live.series("lr"), live.series("dev/weighted_f1")
    # replay the rule on the logged dev F1: from the end of epoch 1 (warm-up), halve after a non-improving epoch
    want, lr, best = [lrs[0]], LR, f1[0]
    for value in f1[1:-1]:
        want.append(lr)
        if value > best:
            best = value
        else:
            lr /= 2
    want.append(lr)
    assert lrs == pytest.approx(want, rel=1e-12)
    assert min(lrs) < LR  # the noise data does plateau
