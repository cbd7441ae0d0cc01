"""Every augmentation equals torchvision.transforms.v2.functional with the same parameters.

Each transform runs on a batch of images (float64, so the comparison is tight), masks
and boxes; the reference calls torchvision's functional image by image on
``tv_tensors.Image`` / ``Mask`` / ``BoundingBoxes`` with the parameters the key drew.
"""

from functools import partial

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from functorch_diary import prng
from functorch_diary.data import augment
from functorch_diary.data.augment import VisionBatch
from functorch_diary.testing import assert_trees_close

N, H, W = 5, 12, 14  # not square: a swapped height and width shows


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(N, 3, H, W, generator=g, dtype=torch.float64)
    masks = torch.randint(0, 4, (N, H, W), generator=g)
    xy = torch.rand(N, 3, 2, generator=g, dtype=torch.float64) * torch.tensor([W - 4, H - 4])
    wh = 2 + torch.rand(N, 3, 2, generator=g, dtype=torch.float64) * 6
    boxes = torch.cat([xy, (xy + wh).clamp(max=torch.tensor([W, H]))], dim=-1)
    return VisionBatch(images, masks, boxes)


def _reference(batch, call):
    """torchvision's functional, image by image: ``call(tv_tensor, i)``."""
    images, masks, boxes = [], [], []
    for i in range(N):
        images.append(call(tv_tensors.Image(batch.images[i]), i).as_subclass(torch.Tensor))
        masks.append(call(tv_tensors.Mask(batch.masks[i]), i).as_subclass(torch.Tensor))
        bb = tv_tensors.BoundingBoxes(batch.boxes[i], format="XYXY", canvas_size=(H, W))
        boxes.append(call(bb, i).as_subclass(torch.Tensor))
    return VisionBatch(torch.stack(images), torch.stack(masks), torch.stack(boxes))


def _check(ours, reference, image_tol=1e-12):
    assert_trees_close(ours.images, reference.images, rtol=0, atol=image_tol)
    assert torch.equal(ours.masks, reference.masks)
    assert_trees_close(ours.boxes, reference.boxes, rtol=0, atol=1e-12)


KEY = prng.key(11)


def test_flips():
    batch = _batch()
    flip = augment.draw_flip(KEY, N)
    assert 0 < int(flip.sum()) < N  # both branches are exercised
    for ours, theirs in (
        (augment.horizontal_flip, TF.horizontal_flip),
        (augment.vertical_flip, TF.vertical_flip),
    ):
        ref = _reference(batch, lambda x, i, theirs=theirs: theirs(x) if flip[i] else x)
        _check(ours(batch, flip), ref)


def test_pad_crop():
    batch, padding = _batch(1), 3
    top, left = augment.draw_pad_crop(KEY, N, padding)
    ref = _reference(
        batch, lambda x, i: TF.crop(TF.pad(x, [padding]), int(top[i]), int(left[i]), H, W)
    )
    _check(augment.pad_crop(batch, top, left, padding), ref)


def test_resized_crop():
    batch = _batch(2)
    params = augment.draw_resized_crop(KEY, N, (H, W), scale=(0.2, 1.0))
    assert len({(int(h), int(w)) for h, w in zip(params[2], params[3], strict=True)}) > 1

    def call(x, i):
        t, left, h, w = (int(p[i]) for p in params)
        return TF.resized_crop(
            x, t, left, h, w, [H, W], InterpolationMode.BILINEAR, antialias=False
        )

    _check(augment.resized_crop(batch, *params), _reference(batch, call))


def test_resized_crop_float32_within_rounding():
    batch = _batch(3)
    batch = batch._replace(images=batch.images.float(), boxes=batch.boxes.float())
    params = augment.draw_resized_crop(KEY, N, (H, W))

    def call(x, i):
        t, left, h, w = (int(p[i]) for p in params)
        return TF.resized_crop(
            x, t, left, h, w, [H, W], InterpolationMode.BILINEAR, antialias=False
        )

    ref = _reference(batch, call)
    ours = augment.resized_crop(batch, *params)
    assert_trees_close(ours.images, ref.images, rtol=0, atol=1e-6)
    assert torch.equal(ours.masks, ref.masks) and torch.equal(ours.boxes, ref.boxes)


def test_rotation():
    batch = _batch(4)
    angle = augment.draw_rotation(KEY, N, 40.0)
    ref = _reference(batch, lambda x, i: TF.rotate(x, float(angle[i]), InterpolationMode.BILINEAR))
    _check(augment.rotate(batch, angle), ref)


def test_color_jitter_leaves_masks_and_boxes():
    batch = _batch(5)
    b, c, s = augment.draw_color_jitter(KEY, N, 0.5, 0.5, 0.5)

    def call(x, i):
        if not isinstance(x, tv_tensors.Image):
            return x
        x = TF.adjust_brightness(x, float(b[i]))
        return TF.adjust_saturation(TF.adjust_contrast(x, float(c[i])), float(s[i]))

    _check(augment.color_jitter(batch, b, c, s), _reference(batch, call))


def test_gaussian_blur():
    batch = _batch(6)
    sigma = augment.draw_gaussian_blur(KEY, N, (0.1, 2.0))

    def call(x, i):
        if not isinstance(x, tv_tensors.Image):
            return x
        return TF.gaussian_blur(x, [5, 5], [float(sigma[i])] * 2)

    _check(augment.gaussian_blur(batch, sigma, 5), _reference(batch, call))


def test_erasing():
    batch = _batch(7)
    params = augment.draw_erasing(KEY, N, (H, W), p=0.4)
    assert 0 < int((params[2] == 0).sum()) < N  # some images erased, some not

    def call(x, i):
        if not isinstance(x, tv_tensors.Image):
            return x  # torchvision's RandomErasing passes masks and boxes through too
        t, left, h, w = (int(p[i]) for p in params)
        return TF.erase(x, t, left, h, w, torch.tensor(0.5, dtype=x.dtype))

    _check(augment.erase(batch, *params, value=0.5), _reference(batch, call))


def test_normalize():
    batch, mean, std = _batch(8), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ref = _reference(
        batch, lambda x, i: TF.normalize(x, mean, std) if isinstance(x, tv_tensors.Image) else x
    )
    _check(augment.normalize(batch, mean, std), ref)


PIPELINE = augment.compose(
    partial(augment.random_resized_crop, scale=(0.3, 1.0)),
    augment.random_pad_crop,
    augment.random_horizontal_flip,
    augment.random_vertical_flip,
    partial(augment.random_rotation, degrees=20.0),
    augment.random_color_jitter,
    augment.random_gaussian_blur,
    augment.random_erasing,
)


def test_pipeline_is_pure_and_keyed():
    batch = _batch(9)
    before = tuple(t.clone() for t in batch)
    rng = torch.get_rng_state()
    a, b, c = PIPELINE(batch, KEY), PIPELINE(batch, KEY), PIPELINE(batch, prng.key(12))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(x, y) for x, y in zip(batch, before, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.images, c.images) and not torch.equal(a.masks, c.masks)


def test_pipeline_compiles_to_one_graph():
    batch = _batch(10)
    batch = batch._replace(images=batch.images.float(), boxes=batch.boxes.float())
    # The geometric transforms, each with a different sampling path (gather, bilinear
    # taps, grid_sample) and a photometric one: ~6 s to trace on 2 cores.
    pipeline = augment.compose(
        augment.random_resized_crop, augment.random_horizontal_flip,
        augment.random_rotation, augment.random_color_jitter,
    )  # fmt: skip
    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True)
    ours, eager = compiled(batch, KEY), pipeline(batch, KEY)
    assert_trees_close(ours.images, eager.images, rtol=0, atol=1e-6)
    assert torch.equal(ours.masks, eager.masks)
    assert_trees_close(ours.boxes, eager.boxes, rtol=0, atol=1e-4)


@pytest.mark.parametrize("p, expected", [(0.0, 0), (1.0, N)])
def test_flip_probability_bounds(p, expected):
    batch = _batch(11)
    out = augment.random_horizontal_flip(batch, KEY, p=p)
    flipped = sum(torch.equal(o, x.flip(-1)) for o, x in zip(out.images, batch.images, strict=True))
    assert flipped == expected


def test_sanitize_boxes_drops_what_torchvision_drops_and_keeps_the_layout():
    # Each kind of box SanitizeBoundingBoxes removes, next to ones it keeps: thin (a side
    # under min_size), small (area under min_area), negative, past the right edge,
    # inverted, the padding slot, and boxes exactly at the limits.
    boxes = torch.tensor(
        [[[1.0, 1.0, 5.0, 6.0], [2.0, 2.0, 2.5, 9.0], [3.0, 3.0, 4.2, 4.2], [-1.0, 0.0, 4.0, 4.0]],
         [[0.0, 0.0, W, H], [5.0, 1.0, W + 0.5, 4.0], [6.0, 6.0, 4.0, 8.0], [0.0, 0.0, 0.0, 0.0]]],
        dtype=torch.float64,
    )  # fmt: skip
    labels = torch.tensor([[0, 1, 2, 3], [1, 2, 0, -1]])
    for min_size, min_area in ((1.0, 1.0), (1.0, 2.0), (2.0, 1.0)):
        before = (boxes.clone(), labels.clone())
        ours, kept = augment.sanitize_boxes(boxes, labels, (H, W), min_size, min_area)
        assert torch.equal(boxes, before[0]) and torch.equal(labels, before[1])
        assert ours.shape == boxes.shape and kept.shape == labels.shape
        for i in range(2):
            real = labels[i] >= 0
            bb = tv_tensors.BoundingBoxes(boxes[i][real], format="XYXY", canvas_size=(H, W))
            theirs, valid = TF.sanitize_bounding_boxes(bb, min_size=min_size, min_area=min_area)
            assert torch.equal(kept[i][kept[i] >= 0], labels[i][real][valid])
            assert torch.equal(ours[i][kept[i] >= 0], theirs.as_subclass(torch.Tensor))
            assert not ours[i][kept[i] < 0].any()  # dropped boxes are padding: zero boxes
    assert kept.tolist()[0][:2] == [0, -1] and kept.tolist()[1][:3] == [1, -1, -1]


def test_random_apply_picks_the_transformed_or_the_original_image_by_image():
    batch = _batch(12)
    rotate = partial(augment.random_rotation, degrees=30.0)
    out = augment.random_apply(rotate, p=0.5)(batch, KEY)
    chosen = augment.draw_flip(prng.fold_in(KEY, 0), N, 0.5)
    assert 0 < int(chosen.sum()) < N  # both branches are exercised
    rotated = rotate(batch, prng.fold_in(KEY, 1))
    for i in range(N):
        want = rotated if chosen[i] else batch
        for got, expected in zip(out, want, strict=True):
            assert torch.equal(got[i], expected[i])
    for p, want in ((0.0, batch), (1.0, rotated)):
        got = augment.random_apply(rotate, p=p)(batch, KEY)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
