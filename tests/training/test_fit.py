"""``fit``: validation held out of the training rows, a history, callbacks that decide
without mutating, checkpoints kept like Orbax/Lightning, resume bit for bit, logs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from functorch_diary import Model, models, optim, prng
from functorch_diary.data import Split
from functorch_diary.training.callbacks import Checkpoint, EarlyStopping
from functorch_diary.training.checkpointing import best_checkpoint, list_checkpoints
from functorch_diary.training.fit import Decision, fit, hold_out
from functorch_diary.training.loggers import TensorBoard
from functorch_diary.tree import tree_leaves

TIMING = ("seconds", "samples_per_second")


@pytest.fixture
def split():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 28, 28, generator=g), torch.randint(0, 10, (60,), generator=g)
    return Split(x[:40], y[:40], x[40:], y[40:])


def _net():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(16, 10))  # fmt: skip


def _run(split, **kwargs):
    # A model with dropout: the resumed run must also draw the same dropout masks.
    return fit(Model(_net), optim.adam(1e-2), split, batch_size=8, validation=0.2,
               progress=False, **kwargs)  # fmt: skip


def _untimed(history):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def test_hold_out_is_disjoint_from_training_and_leaves_test_alone(split):
    x = torch.arange(40.0)
    x_train, _, x_val, _ = hold_out(x, x.long(), 0.25)
    assert len(x_val) == 10 and len(x_train) == 30
    assert sorted(torch.cat([x_train, x_val]).tolist()) == x.tolist()
    result = _run(split, epochs=1)
    assert int(result.train_state.step) == 32 // 8  # 8 of the 40 rows were held out
    assert {"val_loss", "val_accuracy", "lr", "train_loss"} <= set(result.history[0])
    assert set(result.test) == {"loss", "accuracy"}


class StopAfter:
    """A user callback: stops after ``epoch``, and keeps what it was given."""

    def __init__(self, epoch):
        self.epoch, self.seen = epoch, []

    def __call__(self, ts, metrics, history):
        self.seen.append((ts, metrics, history))
        return Decision(True, "interrupted") if metrics["epoch"] == self.epoch else None


def _noise_and_relabel(x, y, key):
    """An augmentation that changes inputs and targets by its key."""
    relabel = prng.uniform(prng.fold_in(key, 1), y.shape) < 0.2
    return x + 0.1 * prng.normal(key, x.shape), torch.where(relabel, (y + 1) % 10, y)


def test_stopped_and_resumed_run_equals_the_uninterrupted_one_bit_for_bit(split):
    # Augmented too: the resumed run must draw each batch's augmentation as the whole did.
    whole = _run(split, epochs=3, augment=_noise_and_relabel)
    stop = StopAfter(1)
    first = _run(split, epochs=3, callbacks=[stop], augment=_noise_and_relabel)
    assert first.stopped == "interrupted" and len(first.history) == 1
    resumed = _run(split, epochs=3, train_state=first.train_state, history=first.history,
                   augment=_noise_and_relabel)  # fmt: skip
    for name, value in whole.train_state.params.items():
        assert torch.equal(resumed.train_state.params[name], value), name
    for got, want in zip(tree_leaves(resumed.train_state), tree_leaves(whole.train_state),
                         strict=True):  # fmt: skip
        assert torch.equal(got, want)
    assert _untimed(resumed.history) == _untimed(whole.history)
    # The callback got the state after epoch 1, which the resumed run did not change.
    assert int(stop.seen[0][0].step) == 4 and stop.seen[0][2][-1] == stop.seen[0][1]


def test_the_step_trains_on_the_targets_augment_returns(split):
    # Every augmented label is 0, so the model learns to answer 0, whatever the true label.
    zeros = split._replace(y_test=torch.zeros_like(split.y_test))
    relabelled = _run(zeros, epochs=8, augment=lambda x, y, key: (x, torch.zeros_like(y)))
    assert relabelled.test["accuracy"] == 1.0
    assert _run(zeros, epochs=8).test["accuracy"] < 0.5


def test_resume_off_an_epoch_boundary_is_refused(split):
    first = _run(split, epochs=1)
    moved = first.train_state._replace(step=first.train_state.step + 1)
    with pytest.raises(ValueError, match="step 5, not at the end of an epoch of 4 steps"):
        _run(split, epochs=2, train_state=moved)


def test_early_stopping_stops_when_the_monitor_stalls(split):
    # lr 0: nothing changes, so val_loss never improves after epoch 1.
    result = fit(models.mlp(hidden=(16,)), optim.sgd(0.0), split, batch_size=8, epochs=10,
                 progress=False, callbacks=[EarlyStopping("val_loss", patience=2)])  # fmt: skip
    assert len(result.history) == 3
    assert result.stopped.startswith("val_loss has not improved for 2 epochs")


def test_checkpoints_keep_the_last_k_and_the_best(split, tmp_path):
    # val_loss by epoch is known from an identical run; keep 1 + the best by val_loss.
    losses = [record["val_loss"] for record in _run(split, epochs=4).history]
    keep = Checkpoint(tmp_path, keep_last=1, monitor="val_loss", mode="min", every=3)
    _run(split, epochs=4, callbacks=[keep])
    names = [path.name for path in list_checkpoints(tmp_path)]
    # Saved at epoch 3 (every 3) and 4 (the end); the best among those saved is kept.
    saved = {3: losses[2], 4: losses[3]}
    best_saved = min(saved, key=saved.get)
    assert names == sorted({f"epoch-{best_saved:06d}.ckpt", "epoch-000004.ckpt"})
    assert best_checkpoint(tmp_path, "val_loss", "min").name == f"epoch-{best_saved:06d}.ckpt"


def test_tensorboard_event_files_are_written_and_readable(split, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _run(split, epochs=2, callbacks=[TensorBoard(tmp_path)], log_every=2)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"epoch/train_loss", "epoch/val_accuracy", "epoch/lr", "step/train_loss",
            "epoch/samples_per_second"} <= set(tags)  # fmt: skip
    loss = events.Scalars("epoch/train_loss")
    assert [e.step for e in loss] == [r["step"] for r in result.history]
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in result.history])
    assert [e.step for e in events.Scalars("step/train_loss")] == [2, 4, 6, 8]
