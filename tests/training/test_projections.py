"""Weight clipping as a projection, against seed 000's ``p.data.clamp_`` loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from functorch_diary import Model, extract, init_train_state, make_train_step, optim
from functorch_diary.testing import assert_trees_close
from functorch_diary.training.projections import clip_params, project_step
from functorch_diary.tree import tree_clone, tree_leaves

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def param_trees(draw):
    names = draw(
        st.lists(st.sampled_from(["a.weight", "a.bias", "b.weight", "c"]), unique=True, min_size=1)
    )
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.floats(1e-3, 1e3))
    gen = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(draw(shapes), generator=gen) for name in names}


@settings(max_examples=50, deadline=None)
@given(params=param_trees(), c=st.floats(1e-4, 10.0))
def test_clipped_params_lie_in_the_box_and_clipping_is_idempotent(params, c):
    before = tree_clone(params)
    clip = clip_params(-c, c)
    once = clip(params)
    assert_trees_close(params, before)  # pure: the input is untouched
    assert all(bool(((leaf >= -c) & (leaf <= c)).all()) for leaf in tree_leaves(once))
    assert_trees_close(clip(once), once)
    # Bit for bit what the seed's in-place loop writes.
    imperative = tree_clone(params)
    for p in imperative.values():
        p.data.clamp_(-c, c)
    assert_trees_close(once, imperative)


def test_selector_clips_only_the_selected_leaves():
    params = {"fc.weight": torch.tensor([5.0, -5.0]), "fc.bias": torch.tensor([5.0])}
    out = clip_params(-1.0, 1.0, selector="*.weight")(params)
    assert out["fc.weight"].tolist() == [1.0, -1.0]
    assert out["fc.bias"] is params["fc.bias"]


def test_clip_params_rejects_an_empty_box():
    with pytest.raises(ValueError, match="lo <= hi"):
        clip_params(0.1, -0.1)


def test_an_update_cannot_express_clipping_exactly():
    # Why clipping is a projection and not a GradientTransformation: apply_updates adds,
    # and p + (clamp(p + u) - p) leaves the box by rounding errors.
    gen = torch.Generator().manual_seed(0)
    p = 0.3 * torch.randn(10_000, generator=gen)
    u = 0.01 * torch.randn(10_000, generator=gen)
    target = (p + u).clamp(-0.01, 0.01)
    via_update = optim.apply_updates({"w": p}, {"w": target - p})["w"]
    assert bool((via_update.abs() > 0.01).any())
    projected = clip_params(-0.01, 0.01)(optim.apply_updates({"w": p}, {"w": u}))["w"]
    assert torch.equal(projected, target)


def test_wgan_style_training_matches_rmsprop_then_clamp():
    # Ten steps of torch.optim.RMSprop followed by the seed's p.data.clamp_ loop.
    model = Model(lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)))
    opt = optim.rmsprop(lr=5e-3)
    clip = clip_params(-0.05, 0.05)
    params, state = model.init(0, dtype=torch.float64)
    params = clip(params)
    ts = init_train_state(model, opt, params=params, state=state)
    step = project_step(make_train_step(model, nn.functional.mse_loss, opt, compile=False), clip)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    net.load_state_dict(model.state_dict(ts.params, ts.state))
    torch_opt = torch.optim.RMSprop(net.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(16, 3, dtype=torch.float64, generator=gen)
        y = torch.randn(16, 1, dtype=torch.float64, generator=gen)
        ts, _ = step(ts, (x, y))
        torch_opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        torch_opt.step()
        for p in net.parameters():
            p.data.clamp_(-0.05, 0.05)
    assert_trees_close(ts.params, extract(net)[0], rtol=1e-10, atol=1e-12)
    assert all(bool(leaf.abs().max() <= 0.05) for leaf in tree_leaves(ts.params))
