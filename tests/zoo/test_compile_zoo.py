"""Every model of the zoo, and both GAN steps, compile to one graph with no graph break.

Issue 3's bar: the compiled step has no graph break for any model in the zoo and is not
recompiled after its first call. For each model family (every module of
``functorch_diary/models/``) the smallest configuration its factory allows is trained for
three steps with ``compile=True``; the test counts, with torch's own counters
(``torch._dynamo.utils.counters``), the graphs compiled (``stats/unique_graphs``, which a
recompilation grows too) and the graph breaks (``graph_break``) over those three calls,
and wants exactly one graph and no break. The steps run with ``fullgraph=True``, so a
break raises, with Dynamo's reason, before it is counted; the break count guards that
policy (a step compiled without ``fullgraph`` would break silently, and be slow). The
compiled params and state must then equal the eager step's, to ``test_compile.py``'s
float32 tolerance, and the GAN critic and generator steps are held to the same.

That comparison checks that the graph computes what the eager step does (same state
threading, dropout keys, ops), not rounding: aot_eager runs the same kernels, so the
two differ only by reordered float sums and the eager optimiser's fused rounding. The
configurations are chosen so that three steps do not amplify such last-bit differences
towards the tolerance; the two whose untrained gradients do (YOLO v1, DeepLabv3 with
weight standardisation) run in float64, where the same growth stays far below it.

The backend is ``aot_eager``: Dynamo captures the graph and AOTAutograd traces its
forward and backward, which is where breaks and recompilations come from, but no kernels
are generated. Inductor's code generation would cost 10-30 s per model on 2 CPU cores
and prove nothing more about graph capture; ``test_compile.py`` runs it for three models.
Even so, Dynamo's tracing is most of this file's time, and it grows with the number of
layers, not their width or the image size: YOLO v1 (24 convolutions), DeepLabv3 and
ResNet-18 take half of the ~75 s, at the fewest layers their factories allow. Widths and
images are tiny so that the eager steps cost nothing.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import functorch_diary as fd
from functorch_diary import Model, losses, models, optim
from functorch_diary.testing import assert_trees_close
from functorch_diary.training import gan
from functorch_diary.tree import tree_map
from tests.helpers import dynamo_counts

STEPS = 3
BATCH = 4
# test_compile.py's float32 bar for compiled vs eager.
COMPILED = {"rtol": 1e-4, "atol": 1e-5}

Batch = tuple[Tensor, Any]
Targets = Callable[[torch.Generator], Any]


# --- targets and losses --------------------------------------------------------------------


def _labels(classes: int, *spatial: int) -> Targets:
    """Class indices, one per sample (or per pixel with ``spatial``)."""
    return lambda gen: torch.randint(0, classes, (BATCH, *spatial), generator=gen)


def _values(*shape: int) -> Targets:
    """Regression targets of ``shape`` per sample."""
    return lambda gen: torch.randn((BATCH, *shape), generator=gen)


def _real_or_fake(gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (BATCH,), generator=gen).float()


def _no_targets(gen: torch.Generator) -> None:
    return None


def _yolo_targets(classes: int, grid: int) -> Targets:
    """Valid YOLO v1 cells: one-hot class, box in [0, 1], objectness 0 or 1."""

    def make(gen: torch.Generator) -> Tensor:
        label = torch.randint(0, classes, (BATCH, grid, grid), generator=gen)
        box = torch.rand((BATCH, grid, grid, 4), generator=gen) * 0.8 + 0.1
        has_object = torch.randint(0, 2, (BATCH, grid, grid, 1), generator=gen).float()
        return torch.cat([F.one_hot(label, classes).float(), box, has_object], dim=-1)

    return make


def _mean_square(outputs: Tensor, targets: None) -> Tensor:
    # For outputs with no natural target (decoded detections): any smooth scalar will do.
    return outputs.square().mean()


# --- the zoo -------------------------------------------------------------------------------

# Every block type the cfg parser knows (conv with/without BatchNorm, each activation,
# both max pools, shortcut, one- and two-layer routes, upsample, two yolo heads), 4 wide.
DARKNET_CFG = """
[net]
channels=3
[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky
[maxpool]
size=2
stride=2
[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=mish
[shortcut]
from=-2
activation=linear
[maxpool]
size=2
stride=1
[convolutional]
filters=14
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=0,1
anchors=2,3, 4,5
classes=2
[route]
layers=-3
[upsample]
stride=2
[route]
layers=-1, 0
[convolutional]
batch_normalize=1
filters=14
size=1
stride=1
pad=1
activation=relu
[yolo]
mask=0,1
anchors=2,3, 4,5
classes=2
"""


@dataclass(frozen=True)
class Case:
    """One model: its factory and the smallest arguments it takes, a batch, a loss, and
    the dtype of its params and inputs."""

    factory: Callable[..., Model]
    kwargs: dict[str, Any]
    input_shape: tuple[int, ...]  # without the batch dimension
    targets: Targets
    loss_fn: Callable[[Any, Any], Tensor]
    dtype: torch.dtype = torch.float32

    @property
    def family(self) -> str:
        """The module under ``functorch_diary/models/`` the factory lives in."""
        return self.factory.__module__.rsplit(".", 1)[-1]

    def batches(self, seed: int = 0) -> list[Batch]:
        gen = torch.Generator().manual_seed(seed)
        batches = [
            (torch.randn((BATCH, *self.input_shape), generator=gen), self.targets(gen))
            for _ in range(STEPS)
        ]
        return tree_map(self._cast, batches)

    def _cast(self, leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            return leaf.to(self.dtype)
        return leaf


CASES: dict[str, Case] = {
    "mlp": Case(
        models.mlp,
        {"in_features": 6, "hidden": (8,), "num_classes": 3},
        (6,),
        _labels(3),
        F.cross_entropy,
    ),
    "linear_regression": Case(
        models.linear_regression, {"in_features": 3}, (3,), _values(1), F.mse_loss
    ),
    "logistic_regression": Case(
        models.logistic_regression,
        {"in_features": 12, "num_classes": 3},
        (3, 2, 2),
        _labels(3),
        F.cross_entropy,
    ),
    # LeNet's sizes are fixed (16 * 4 * 4 features): 28x28 is the only image it takes.
    "lenet": Case(models.lenet, {"num_classes": 3}, (1, 28, 28), _labels(3), F.cross_entropy),
    # Widths 1..8; five pools take 32x32 to 1x1. Without BatchNorm (the default): the other
    # families cover it, and VGG's 13 more BatchNorms would add seconds of tracing.
    "vgg16": Case(
        models.vgg16,
        {"num_classes": 3, "pool_size": 1, "hidden": 8, "width_divisor": 64},
        (3, 32, 32),
        _labels(3),
        F.cross_entropy,
    ),
    # Widths are torchvision's (64..512, not configurable); 16x16 is 2x2 after layer4.
    "resnet18": Case(models.resnet18, {"num_classes": 3}, (3, 16, 16), _labels(3), F.cross_entropy),
    "densenet_bc": Case(
        models.densenet_bc,
        {"depth": 10, "growth_rate": 2, "num_classes": 3},
        (3, 8, 8),
        _labels(3),
        F.cross_entropy,
    ),
    "unet": Case(
        models.unet,
        {"in_channels": 1, "num_classes": 3, "base": 2, "depth": 1},
        (1, 4, 4),
        _labels(3, 4, 4),
        losses.segmentation_cross_entropy,
    ),
    # 24 convolutions at most 16 wide; 64x64 is the smallest image (grid 1). Two boxes, so
    # the loss's "responsible box" argmax is traced too. float64: 24 plain conv+BatchNorm
    # layers make the untrained net's gradients explode (the first step moves the first
    # convolution 10 times its norm), and in float32 a last-bit difference after one step
    # (the eager optimiser's fused rounding) grows past the tolerance within three:
    # eager float32 and float64 end ~5e3 tolerances apart. In float64 the same growth
    # stays far below it, and a real difference (a wrong state, key or op) does not.
    "yolo_v1": Case(
        models.yolo_v1,
        {"num_classes": 1, "boxes": 2, "image_size": 64, "width_divisor": 64, "hidden": 4},
        (3, 64, 64),
        _yolo_targets(1, 1),
        lambda out, y: losses.yolo_v1_loss(out, y, num_classes=1, boxes=2),
        torch.float64,
    ),
    # The seed's options on (weight standardisation, GroupNorm): each adds ops to trace.
    # A ResNet-18 backbone with one block per stage; 32x32 is 1x1 at its output stride 32.
    # float64 for yolo_v1's reason, milder: standardisation divides the first
    # convolution's gradient by its weight's std after cancelling its mean, and eager
    # float32 and float64 end ~2 tolerances apart (0.02 without standardisation).
    "deeplabv3": Case(
        models.deeplabv3,
        {
            "num_classes": 3,
            "layers": (1, 1, 1, 1),
            "block": "basic",
            "dilate_last": False,
            "aspp_channels": 4,
            "num_groups": 2,
            "weight_std": True,
        },
        (3, 32, 32),
        _labels(3, 32, 32),
        losses.segmentation_cross_entropy,
        torch.float64,
    ),
    "darknet_cfg": Case(
        models.darknet_from_cfg, {"cfg": DARKNET_CFG}, (3, 8, 8), _no_targets, _mean_square
    ),
    "dcgan_generator": Case(
        models.dcgan_generator,
        {"latent_dim": 4, "width": 2, "image_size": 8},
        (4,),
        _values(1, 8, 8),
        F.mse_loss,
    ),
    "dcgan_discriminator": Case(
        models.dcgan_discriminator,
        {"width": 2, "image_size": 8},
        (1, 8, 8),
        _real_or_fake,
        F.binary_cross_entropy_with_logits,
    ),
}


def test_every_model_family_has_a_case():
    # A new file under functorch_diary/models/ must come with a compile case here.
    families = {info.name for info in pkgutil.iter_modules(models.__path__)}
    assert {case.family for case in CASES.values()} == families


def _run(step: Callable, ts: fd.TrainState, batches: list[Batch]) -> fd.TrainState:
    for batch in batches:
        ts, _ = step(ts, batch)
    return ts


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_step_compiles_once_without_breaks_and_matches_eager(name: str):
    case = CASES[name]
    model = case.factory(**case.kwargs)
    opt = optim.sgd(0.01, momentum=0.9)
    ts0 = fd.init_train_state(model, opt, seed=0, dtype=case.dtype)
    batches = case.batches()

    step = fd.make_train_step(model, case.loss_fn, opt, compile=True, compile_backend="aot_eager")
    with dynamo_counts() as seen:
        compiled = _run(step, ts0, batches)
    eager = _run(fd.make_train_step(model, case.loss_fn, opt, compile=False), ts0, batches)

    assert seen == {"graphs": 1, "breaks": 0}
    # The state too: BatchNorm statistics are threaded through the graph, not mutated.
    assert_trees_close((compiled.params, compiled.state), (eager.params, eager.state), **COMPILED)
    assert int(compiled.step) == STEPS


def test_the_counts_see_a_recompilation():
    # The control for the test above: "one graph" would hold vacuously if the counters
    # missed compilations. A new batch size makes Dynamo compile a second graph.
    case = CASES["linear_regression"]  # the cheapest to trace, twice
    model = case.factory(**case.kwargs)
    opt = optim.sgd(0.01)
    step = fd.make_train_step(model, case.loss_fn, opt, compile=True, compile_backend="aot_eager")
    (x, y), _, _ = case.batches()
    with dynamo_counts() as seen:
        _run(step, fd.init_train_state(model, opt), [(x, y), (x, y), (x[:1], y[:1])])
    assert seen == {"graphs": 2, "breaks": 0}


# --- the GAN steps -------------------------------------------------------------------------

LATENT, SIZE = 4, 8


def _gan_rounds(seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Per round: real images, the critic's noise, its interpolation weights, the
    generator's noise."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand((BATCH, 1, SIZE, SIZE), generator=gen) * 2 - 1,
            torch.randn((BATCH, LATENT), generator=gen),
            torch.rand((BATCH,), generator=gen),
            torch.randn((BATCH, LATENT), generator=gen),
        )
        for _ in range(STEPS)
    ]


def _alternate(
    critic_step: Callable, generator_step: Callable, gs: gan.GANState, rounds: list
) -> tuple[gan.GANState, dict[str, dict[str, int]]]:
    """One critic step then one generator step per round; the Dynamo counts of each."""
    seen = {"critic": {"graphs": 0, "breaks": 0}, "generator": {"graphs": 0, "breaks": 0}}
    for real, z, alpha, z_generator in rounds:
        with dynamo_counts() as critic:
            gs, _ = critic_step(gs, real, z, alpha)
        with dynamo_counts() as generator:
            gs, _ = generator_step(gs, z_generator)
        for key in ("graphs", "breaks"):
            seen["critic"][key] += critic[key]
            seen["generator"][key] += generator[key]
    return gs, seen


def test_wgan_gp_steps_each_compile_once_without_breaks_and_match_eager():
    # WGAN-GP: the critic's gradient differentiates through vmap(grad(...)) of itself (the
    # penalty), the hardest thing here for Dynamo to capture. The generator has
    # BatchNorm, whose statistics both steps thread; the critic has none (the penalty is
    # per sample).
    g = models.dcgan_generator(latent_dim=LATENT, width=2, image_size=SIZE)
    d = models.dcgan_discriminator(width=2, image_size=SIZE, norm="none")
    opt = optim.adam(1e-3, betas=(0.5, 0.9))
    # aot_eager: Dynamo and AOTAutograd without Inductor's code generation (seconds, not
    # tens of seconds); the compile policy is the one Inductor gets.
    steps = {
        mode: (
            gan.make_critic_step(
                g, d, gan.wasserstein_critic_loss, opt, penalty_weight=10.0, **options
            ),
            gan.make_generator_step(g, d, gan.wasserstein_generator_loss, opt, **options),
        )
        for mode, options in [
            ("compiled", {"compile": True, "compile_backend": "aot_eager"}),
            ("eager", {"compile": False}),
        ]
    }
    gs0 = gan.init_gan_state(g, d, opt, opt)
    rounds = _gan_rounds()

    compiled, seen = _alternate(*steps["compiled"], gs0, rounds)
    eager, _ = _alternate(*steps["eager"], gs0, rounds)

    one_graph = {"graphs": 1, "breaks": 0}
    assert seen == {"critic": one_graph, "generator": one_graph}
    assert_trees_close(compiled, eager, **COMPILED)
    assert (int(compiled.critic.step), int(compiled.generator.step)) == (STEPS, STEPS)
