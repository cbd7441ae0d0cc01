"""style.py against an imperative reference on torchvision's ``vgg19`` with forward hooks."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.func import grad_and_value
from torch.nn import functional as F

from functorch_diary.model.checks import TreeMismatchError
from functorch_diary.testing import assert_trees_close
from functorch_diary.zoo import style

F64 = {"rtol": 1e-9, "atol": 1e-12}
SLICES = {"relu1_1": 1, "relu2_1": 6, "relu3_3": 15, "relu4_3": 24, "relu5_3": 33}
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """torchvision's vgg19 (random weights, built once) and its weights saved as a file.

    The file keeps only ``features.*`` and one small stand-in classifier key: the real
    classifier is 400 MB and the loader must ignore it anyway.
    """
    torch.manual_seed(0)
    net = torchvision.models.vgg19()
    weights = {k: v for k, v in net.state_dict().items() if k.startswith("features.")}
    weights["classifier.0.bias"] = net.classifier[0].bias.detach().clone()
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(weights, path)
    return net.features.double().eval(), path


def reference_loss(features, image, content, style_image, cw, sw):
    """Seed 000's way: hooks collect the slices; requires_grad on the image; backward."""
    seen = {}
    handles = [
        features[i].register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, out))
        for name, i in SLICES.items()
    ]

    def slices(img):
        seen.clear()
        features((img - MEAN) / STD)
        return dict(seen)

    def gram(f):
        n, c, h, w = f.shape
        flat = f.view(n, c, h * w)
        return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)

    with torch.no_grad():
        content_f = slices(content)["relu4_3"].clone()
        style_g = {n: gram(f) for n, f in slices(style_image).items()}
    leaf = image.clone().requires_grad_(True)
    found = slices(leaf)
    content_loss = F.mse_loss(found["relu4_3"], content_f)
    style_loss = sum(F.mse_loss(gram(found[n]), style_g[n]) for n in SLICES)
    loss = cw * content_loss + sw * style_loss
    loss.backward()
    for handle in handles:
        handle.remove()
    return loss.detach(), leaf.grad


def test_style_loss_and_gradient_equal_hooked_torchvision_vgg19(vgg_file):
    reference, path = vgg_file
    vgg, params, state = style.load_vgg19_features(path, dtype=torch.float64)
    kept = {
        f"features.{k}": v for k, v in reference.state_dict().items() if int(k.split(".")[0]) < 34
    }
    assert_trees_close(params, kept)  # every conv up to relu5_3, the classifier key ignored
    gen = torch.Generator().manual_seed(1)
    content, target, image = (
        torch.rand(1, 3, 32, 32, dtype=torch.float64, generator=gen) for _ in range(3)
    )
    loss = style.make_style_loss(
        vgg, params, state, content, target, content_weight=2.0, style_weight=1e3
    )
    before = image.clone()
    (grads, (total, parts)) = grad_and_value(loss, has_aux=True)(image)
    ref_total, ref_grad = reference_loss(reference, image, content, target, 2.0, 1e3)
    assert_trees_close(total, ref_total, **F64)
    assert_trees_close(grads, ref_grad, **F64)
    assert_trees_close(total, 2.0 * parts["content"] + 1e3 * parts["style"], **F64)
    assert_trees_close(image, before)


def test_transfer_adam_equals_torch_optim_adam_with_clamp(vgg_file):
    _, path = vgg_file
    vgg, params, state = style.load_vgg19_features(path, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    content, target = (
        torch.rand(1, 3, 16, 16, dtype=torch.float64, generator=gen) for _ in range(2)
    )
    loss = style.make_style_loss(vgg, params, state, content, target)
    seen = []
    result = style.transfer(
        loss, content, steps=3, lr=0.05, progress=lambda i, v: seen.append(v["loss"])
    )
    # Imperative twin: torch.optim.Adam on a leaf image, clamped in place after each step.
    x = content.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        loss(x)[0].backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    assert_trees_close(result, x.detach(), rtol=1e-8, atol=1e-10)
    assert len(seen) == 3 and seen[-1] < seen[0]
    assert float(result.min()) >= 0.0 and float(result.max()) <= 1.0


def test_transfer_lbfgs_lowers_the_loss(vgg_file):
    _, path = vgg_file
    vgg, params, state = style.load_vgg19_features(path)
    gen = torch.Generator().manual_seed(3)
    content, target = (torch.rand(1, 3, 16, 16, generator=gen) for _ in range(2))
    loss = style.make_style_loss(vgg, params, state, content, target)
    result = style.transfer(loss, content, steps=3, lr=1.0, method="lbfgs")
    assert float(loss(result)[0]) < float(loss(content)[0])
    with pytest.raises(ValueError, match="'adam' or 'lbfgs'"):
        style.transfer(loss, content, steps=1, method="sgd")


def test_gram_matrix_and_normalize_match_definitions():
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    expected = torch.einsum("nchw,ndhw->ncd", f, f) / (3 * 4 * 5)
    assert_trees_close(style.gram_matrix(f), expected, **F64)
    img = torch.rand(1, 3, 2, 2, dtype=torch.float64)
    normalize = torchvision.transforms.Normalize(style.IMAGENET_MEAN, style.IMAGENET_STD)
    assert_trees_close(style.normalize(img), normalize(img), **F64)


def test_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*IMAGENET1K_V1"):
        style.load_vgg19_features(tmp_path / "nope.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(TreeMismatchError, match=r"features\.0\.bias"):
        style.load_vgg19_features(tmp_path / "partial.pth")
    vgg = style.vgg19_features()
    params, state = vgg.init(seed=0)
    with pytest.raises(ValueError, match="unknown layers"):
        style.make_style_loss(
            vgg,
            params,
            state,
            torch.rand(1, 3, 8, 8),
            torch.rand(1, 3, 8, 8),
            style_layers=["relu9"],
        )


def test_legacy_format_weights_file_loads_the_same(vgg_file, tmp_path):
    # Files saved by torch < 1.6 (as old hub caches are) are not zip files: no mmap.
    _, path = vgg_file
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(path, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    _, params, _ = style.load_vgg19_features(legacy)
    _, expected, _ = style.load_vgg19_features(path)
    assert_trees_close(params, expected)
