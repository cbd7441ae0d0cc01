"""The CIFAR-10 pipeline end to end, on small files written in the real batch format."""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch

from functorch_diary import prng
from functorch_diary.cli.recipes.cifar import RECIPES, augment_cifar, load_cifar_data
from functorch_diary.data.cifar import (
    CIFAR10_FILES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    cifar10_split,
    load_cifar10,
)
from functorch_diary.testing import assert_trees_close
from functorch_diary.training.fit import fit
from functorch_diary.zoo.models import vgg16
from tests.helpers import write_cifar


@pytest.mark.parametrize("protocol", [2, 5])
def test_batches_load_with_the_documented_pixel_layout(tmp_path, protocol):
    written = write_cifar(tmp_path, protocol=protocol)
    data = load_cifar10(tmp_path)
    assert data.x_train.shape == (300, 3, 32, 32) and data.x_train.dtype == torch.uint8
    assert data.x_test.shape == (100, 3, 32, 32) and data.y_test.dtype == torch.int64
    assert data.classes[:2] == ["airplane", "automobile"] and len(data.classes) == 10
    labels = [v for i in range(1, 6) for v in written[f"data_batch_{i}"][b"labels"]]
    assert data.y_train.tolist() == labels
    # Pixel (c, h, w) of image i is byte c * 1024 + h * 32 + w of row i (batches in order).
    rows = np.concatenate([written[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    rng = np.random.default_rng(1)
    for i, c, h, w in zip(*(rng.integers(0, m, 50) for m in (300, 3, 32, 32)), strict=True):
        assert int(data.x_train[i, c, h, w]) == int(rows[i, c * 1024 + h * 32 + w])


def test_the_unpacked_archive_folder_is_found(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    assert len(load_cifar10(tmp_path).x_test) == 100


def test_missing_files_are_named(tmp_path):
    write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    os.remove(tmp_path / "batches.meta")
    with pytest.raises(FileNotFoundError, match=r"not found in .*: data_batch_3, batches\.meta;"):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir") as info:
        load_cifar_data(None)
    assert all(name in str(info.value) for name in CIFAR10_FILES)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_batch_that_names_code_is_refused_before_running_it(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as handle:
        pickle.dump({b"data": _Payload(), b"labels": []}, handle, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|nt)\.system"):
        load_cifar10(tmp_path)


def test_wrong_contents_are_explained(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(ValueError, match=r"data_batch_1: data must be uint8 of shape \(N, 3072\)"):
        load_cifar10(tmp_path)


def test_split_is_scaled_and_standardised(tmp_path):
    write_cifar(tmp_path)
    raw, split = load_cifar10(tmp_path), cifar10_split(tmp_path)
    assert split.x_train.dtype == torch.float32
    i, c, h, w = 7, 2, 5, 9
    expected = (raw.x_train[i, c, h, w].item() / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
    assert split.x_train[i, c, h, w].item() == pytest.approx(expected, rel=1e-5)
    assert_trees_close(cifar10_split(tmp_path, normalize=False).x_test, raw.x_test / 255.0)


def test_augmentation_is_a_crop_and_flip_of_each_image():
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6)
    key = prng.key(3)
    before = x.clone()
    out, labels = augment_cifar(x, y, key, padding=2)
    assert torch.equal(x, before)  # pure: the batch given is untouched
    assert torch.equal(labels, torch.arange(6))  # a crop or flip changes no class
    assert torch.equal(out, augment_cifar(x, y, key, padding=2)[0])
    assert not torch.equal(out, augment_cifar(x, y, prng.fold_in(key, 1), padding=2)[0])
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        candidates = [
            view.flip(-1) if flip else view
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            for view in [padded[i, :, dy : dy + 8, dx : dx + 8]]
        ]
        assert any(torch.equal(out[i], cand) for cand in candidates)


def test_recipes_follow_seed_000():
    assert set(RECIPES) == {"resnet", "vgg", "densenet"}
    for recipe in RECIPES.values():
        assert recipe.load_data is load_cifar_data and recipe.augment is augment_cifar
    densenet = RECIPES["densenet"].build_model()
    # DenseNet-BC (L=100, k=12): the paper's 0.8M parameters.
    assert sum(s.shape.numel() for s in densenet.param_specs.values()) == 769_162


def test_recipe_optimiser_matches_sgd_with_multisteplr():
    """Seed 000's torch.optim.SGD + MultiStepLR, step for step, milestones at 50%/75%."""
    total = 40
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, dtype=torch.float64, generator=g) for _ in range(total)]
    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64, generator=g))
    params = {"w": w.detach().clone()}
    torch_opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(torch_opt, milestones=[20, 30], gamma=0.1)
    opt = RECIPES["resnet"].make_optimizer(0.1, total)
    opt_state = opt.init(params)
    for grad in grads:
        w.grad = grad.clone()
        torch_opt.step()
        scheduler.step()
        updates, opt_state = opt.update({"w": grad}, opt_state, params)
        params = {"w": params["w"] + updates["w"]}
    assert_trees_close(params, {"w": w.detach()}, rtol=1e-10, atol=1e-12)


def test_end_to_end_training_on_written_batches(tmp_path):
    write_cifar(tmp_path)
    recipe = dataclasses.replace(
        RECIPES["vgg"],
        build_model=lambda: vgg16(10, True, pool_size=1, hidden=16, width_divisor=16),
        epochs=2,
        batch_size=100,
    )
    split = recipe.load_data(tmp_path)
    result = fit(
        recipe.build_model(),
        recipe.make_optimizer(recipe.lr, 4),
        split,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        augment=recipe.augment,
        progress=False,
    )
    assert [m["epoch"] for m in result.history] == [1, 2]
    # 300 training images, 30 held out for validation: 270 // 100 = 2 steps an epoch.
    assert int(result.train_state.step) == 4
    first, last = result.history
    # Only classes 0 and 1 occur: even four steps move the logits towards them.
    assert last["train_loss"] < first["train_loss"]
    assert 0.0 <= last["val_accuracy"] <= 1.0 and 0.0 <= result.test["accuracy"] <= 1.0
