"""Every random draw inside ``apply`` comes from the explicit key, for any model.

Per op family: the same key gives the same bits, another key other draws, torch's global
generator is neither read nor advanced, and the draws have the right distribution.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import functorch_diary as fd
from functorch_diary import Model, optim, prng
from functorch_diary.model.randomness import (
    KeyedRandomness,
    MissingRngError,
    UnkeyedRandomnessError,
)
from functorch_diary.testing import assert_trees_close
from functorch_diary.training import ensemble
from tests.helpers import dynamo_counts


def global_rng_untouched(fn):
    """Run ``fn`` and assert torch's global CPU generator state is bit-for-bit unchanged."""
    before = torch.get_rng_state()
    out = fn()
    assert torch.equal(torch.get_rng_state(), before), "the global generator was advanced"
    return out


class FunctionalDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, p=0.25, training=self.training)


class NoiseInjection(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x) if self.training else x


class BernoulliMask(nn.Module):
    def forward(self, x):
        if not self.training:
            return x
        return x * torch.empty_like(x).bernoulli_(0.7) * torch.bernoulli(torch.full_like(x, 0.5))


FAMILIES = {
    "module-dropout": (lambda: nn.Dropout(0.25), "keep", 0.75),
    "dropout2d": (lambda: nn.Dropout2d(0.25), "keep", 0.75),
    "functional-dropout": (FunctionalDropout, "keep", 0.75),
    "noise-injection": (NoiseInjection, "noise", None),
    "bernoulli-masks": (BernoulliMask, "keep", 0.35),
    "rrelu": (lambda: nn.RReLU(0.1, 0.3), "slope", (0.1, 0.3)),
    "stochastic-depth": (
        lambda: torchvision.ops.StochasticDepth(0.25, "row"),
        "keep",
        0.75,
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_random_op_family_is_keyed(family):
    build, kind, expected = FAMILIES[family]
    model = Model(build)
    params, state = model.init()
    x = torch.ones(512, 8, 4, 4) if kind != "slope" else -torch.ones(512, 8, 4, 4)
    run = lambda rng: model.apply(params, state, x, train=True, rng=rng)[0]  # noqa: E731
    a = global_rng_untouched(lambda: run(5))
    assert torch.equal(a, global_rng_untouched(lambda: run(5)))
    assert not torch.equal(a, run(999))
    if kind == "keep":
        assert_close_rate((a != 0).double().mean(), expected)
        kept = a[a != 0]
        assert torch.allclose(kept, kept.flatten()[0].expand_as(kept))  # one scale for all
    elif kind == "noise":
        noise = a - x
        assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1.0) < 0.02
    else:
        slopes = -a
        low, high = expected
        assert float(slopes.min()) >= low and float(slopes.max()) <= high
        assert_close_rate(slopes.mean(), (low + high) / 2, tol=0.005)
    # Eval mode draws nothing: no rng needed, the global generator untouched.
    evaluated = global_rng_untouched(lambda: model.apply(params, state, x, train=False)[0])
    assert evaluated.shape == x.shape


def assert_close_rate(value, expected, tol=0.01):
    assert abs(float(value) - expected) < tol, (float(value), expected)


# --- the distributions of torch's random functions, answered from the key --------------------

DRAWS = {
    "rand": (lambda: torch.rand(200_000), 0.5, 1 / math.sqrt(12)),
    "randn": (lambda: torch.randn(200_000, dtype=torch.float64), 0.0, 1.0),
    "uniform_": (lambda: torch.empty(200_000).uniform_(-2, 4), 1.0, 6 / math.sqrt(12)),
    "normal_": (lambda: torch.empty(200_000).normal_(3.0, 0.5), 3.0, 0.5),
    "normal": (lambda: torch.normal(torch.full((200_000,), -1.0), 2.0), -1.0, 2.0),
    "exponential_": (lambda: torch.empty(200_000).exponential_(4.0), 0.25, 0.25),
    "bernoulli": (lambda: torch.bernoulli(torch.full((200_000,), 0.3)), 0.3, math.sqrt(0.21)),
    "randint": (lambda: torch.randint(3, 13, (200_000,)).double(), 7.5, math.sqrt(99 / 12)),
    "geometric_": (lambda: torch.empty(200_000).geometric_(0.5), 2.0, math.sqrt(2.0)),
    "log_normal_": (
        lambda: torch.empty(200_000, dtype=torch.float64).log_normal_(0.0, 0.25),
        math.exp(0.25**2 / 2),
        math.sqrt((math.exp(0.25**2) - 1) * math.exp(0.25**2)),
    ),
}


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_keyed_draws_have_torch_s_distribution(name):
    draw, mean, std = DRAWS[name]
    with KeyedRandomness(prng.key(1)):
        a = global_rng_untouched(draw)
    with KeyedRandomness(prng.key(1)):
        b = draw()
    with KeyedRandomness(prng.key(2)):
        c = draw()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.mean()) - mean) < 0.02 * max(1.0, std), float(a.mean())
    assert abs(float(a.std()) - std) < 0.02 * max(1.0, std), float(a.std())


def test_randint_randperm_multinomial_cover_their_range():
    with KeyedRandomness(prng.key(3)):
        ints = torch.randint(10, (50_000,))
        perm = torch.randperm(1000)
        counts = torch.bincount(torch.multinomial(torch.tensor([1.0, 2.0, 7.0]), 30_000, True))
        picked = torch.multinomial(torch.tensor([0.0, 1.0, 1.0, 1.0]), 3)
    assert ints.min() == 0 and ints.max() == 9 and ints.dtype == torch.int64
    assert (torch.bincount(ints).double() / 50_000 - 0.1).abs().max() < 0.01
    assert torch.equal(perm.sort().values, torch.arange(1000))
    assert (counts.double() / 30_000 - torch.tensor([0.1, 0.2, 0.7])).abs().max() < 0.01
    assert sorted(picked.tolist()) == [1, 2, 3]  # without replacement, never the zero class


def test_a_random_function_with_no_keyed_version_is_refused():
    with KeyedRandomness(prng.key(0)), pytest.raises(UnkeyedRandomnessError, match="poisson"):
        global_rng_untouched(lambda: torch.poisson(torch.ones(3)))


# --- rng is needed only when something is drawn ------------------------------------------


def test_rng_is_demanded_only_when_the_forward_draws():
    quiet = Model(lambda: nn.Sequential(nn.Linear(3, 3), nn.Dropout(p=0.0)))
    params, state = quiet.init()
    quiet.apply(params, state, torch.ones(2, 3), train=True)  # p=0 draws nothing
    noisy = Model(lambda: nn.Sequential(nn.Linear(3, 3), NoiseInjection()))
    params, state = noisy.init()
    with pytest.raises(MissingRngError, match=r"torch\.randn_like.*layer '1'"):
        global_rng_untouched(lambda: noisy.apply(params, state, torch.ones(2, 3), train=True))


def test_keyed_dropout_equals_torch_s_dropout_given_the_same_mask():
    """Parity where the stream must differ from torch's: feed both sides the same mask."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.4)).double()
    model, params, state = Model.from_module(net)
    x = torch.randn(32, 6, dtype=torch.float64)
    out, _ = model.apply(params, state, x, train=True, rng=7)
    mask_model = Model(lambda: nn.Dropout(0.4))
    scaled_mask, _ = mask_model.apply({}, {}, torch.ones(32, 6, dtype=torch.float64), train=True,
                                      rng=7)
    assert_trees_close(out, net[0](x) * scaled_mask, rtol=1e-12, atol=1e-12)
    assert set(scaled_mask.unique().tolist()) == {0.0, 1 / 0.6}


# --- torchvision's efficientnet_b0: 16 StochasticDepth layers and dropout ---------------------


def _efficientnet():
    return Model(lambda: torchvision.models.efficientnet_b0(num_classes=4))


def test_efficientnet_train_step_is_a_function_of_its_key():
    model = _efficientnet()
    opt = optim.sgd(0.01)
    ts = fd.init_train_state(model, opt, seed=0)
    step = fd.make_train_step(model, F.cross_entropy, opt)
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 3]))
    a, ma = global_rng_untouched(lambda: step(ts, batch))
    b, mb = step(ts, batch)
    assert torch.equal(ma["loss"], mb["loss"])
    assert_trees_close(a.params, b.params, rtol=0, atol=0)
    _, mo = step(ts._replace(rng=prng.key(123)), batch)
    assert not torch.equal(ma["loss"], mo["loss"])


def test_efficientnet_ensemble_members_draw_their_own_masks():
    model = _efficientnet()
    opt = optim.sgd(0.01)
    members = ensemble.init_ensemble(model, opt, seeds=[0, 0])
    members = members._replace(rng=torch.stack([prng.key(1), prng.key(2)]))
    step = ensemble.make_ensemble_train_step(model, F.cross_entropy, opt)
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 3]))
    new, metrics = global_rng_untouched(lambda: step(members, batch))
    # Same init, same batch: only the members' keys differ, and so do their losses.
    assert metrics["loss"].shape == (2,) and metrics["loss"][0] != metrics["loss"][1]
    again, _ = step(members, batch)
    assert_trees_close(new.params, again.params, rtol=0, atol=0)


# --- compiled: the mode is traced, no graph breaks, no recompiles -----------------------------


class TinyStochastic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.depth = torchvision.ops.StochasticDepth(0.5, "row")
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        x = x + self.depth(self.conv(x))
        return self.head(F.dropout(x.flatten(1), 0.3, self.training))


def test_compiled_stochastic_step_has_no_graph_breaks_and_matches_eager():
    model = Model(TinyStochastic)
    opt = optim.adam(1e-2)
    eager = fd.make_train_step(model, F.cross_entropy, opt, compile=False)
    compiled = fd.make_train_step(
        model, F.cross_entropy, opt, compile=True, compile_backend="aot_eager"
    )
    ts = fd.init_train_state(model, opt, seed=0)
    x, y = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 0])
    want = ts
    with dynamo_counts() as seen:
        got = ts
        for _ in range(3):
            got, _ = global_rng_untouched(lambda got=got: compiled(got, (x, y)))
            want, _ = eager(want, (x, y))
    assert seen == {"graphs": 1, "breaks": 0}
    assert_trees_close(got.params, want.params, rtol=1e-5, atol=1e-6)
