"""NAdam, RAdam, Adamax, Adadelta, ASGD, Rprop, Adafactor and Muon against ``torch.optim``.

Float64, 50 steps of a correlated gradient sequence over leaves of several ranks (a scalar
included). ``apply_gradients`` must be torch's ``foreach=True`` step to the bit (Muon, which
has no foreach step: its only step), in float64 and float32; ``update`` + ``apply_updates``
within 1e-12; the traced form (tensor scalars, as under compile or autograd) within 1e-12.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from functorch_diary import optim
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone, tree_leaves
from tests.helpers import TORCH, dynamo_counts

STEPS = 50
F64 = {"rtol": 1e-12, "atol": 1e-12}
EXACT = {"rtol": 0.0, "atol": 0.0}

CASES = [
    ("nadam", {}),
    ("nadam", {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "momentum_decay": 1e-2}),
    ("nadam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("nadam", {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("nadam", {"lr": 1e-2, "weight_decay": 0.1, "maximize": True}),
    ("radam", {}),
    ("radam", {"lr": 1e-2, "betas": (0.5, 0.9), "eps": 1e-4}),
    ("radam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("radam", {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
    ("adamax", {}),
    ("adamax", {"lr": 1e-2, "betas": (0.5, 0.99), "eps": 1e-3}),
    ("adamax", {"lr": 1e-2, "weight_decay": 0.1, "maximize": True}),
    ("adadelta", {}),
    ("adadelta", {"lr": 0.5, "rho": 0.8, "eps": 1e-4}),
    ("adadelta", {"weight_decay": 0.1, "maximize": True}),
    ("asgd", {}),
    ("asgd", {"lr": 0.05, "lambd": 1e-2, "alpha": 0.6, "t0": 10}),
    ("asgd", {"lr": 0.05, "t0": 5, "weight_decay": 0.1, "maximize": True}),
    ("rprop", {}),
    ("rprop", {"lr": 0.05, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.1)}),
    ("rprop", {"maximize": True}),
    ("adafactor", {}),
    ("adafactor", {"lr": 0.05, "beta2_decay": -0.5, "eps": (1e-20, 1e-2), "d": 1.5}),
    ("adafactor", {"weight_decay": 0.1, "maximize": True}),
    ("muon", {}),
    ("muon", {"lr": 0.02, "weight_decay": 0.0, "momentum": 0.9, "nesterov": False}),
    ("muon", {"adjust_lr_fn": "match_rms_adamw", "ns_steps": 3, "eps": 1e-5}),
    ("muon", {"adjust_lr_fn": "spectral_unclamped", "ns_coefficients": (3.0, -3.2, 1.2)}),
]
IDS = [f"{name}-{kwargs}" for name, kwargs in CASES]
#: torch.optim's implementation each is written after: Muon has no foreach step.
FOREACH = {"foreach": True}


def implementation(name: str) -> dict[str, bool]:
    return {} if name == "muon" else FOREACH


def make_params(name: str, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if name == "muon":  # matrices only: wide, tall and square
        shapes = {"wide": (4, 6), "tall": (7, 3), "square": (5, 5)}
    else:
        shapes = {"conv": (4, 3, 3, 3), "bias": (4,), "fc": (5, 7), "scale": ()}
    return {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}


def grad_sequence(params: dict, steps: int = STEPS, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    # A shared component keeps signs steady for a while (Rprop grows its steps), the noise
    # flips some (it shrinks them).
    base = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    return [
        {k: base[k] + torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
        for _ in range(steps)
    ]


def run_torch(name: str, kwargs: dict, params: dict, seq: list[dict], **impl: bool):
    tensors = [nn.Parameter(v.clone()) for v in params.values()]
    opt = TORCH[name](tensors, **impl, **kwargs)
    for grads in seq:
        for t, g in zip(tensors, grads.values(), strict=True):
            t.grad = g.clone()
        opt.step()
    return {k: t.detach() for k, t in zip(params, tensors, strict=True)}, opt, tensors


def run_functional(opt, params: dict, seq: list[dict], path: str):
    """``path``: "fused" (apply_gradients), "update" (update + apply_updates) or "traced"
    (update + apply_updates on params that autograd records: the tensor-scalar form)."""
    state = opt.init(params)
    if path == "traced":
        params = {k: v.clone().requires_grad_() for k, v in params.items()}
    for grads in seq:
        if path == "fused":
            params, state = optim.apply_gradients(opt, grads, state, params)
        else:
            updates, state = opt.update(grads, state, params)
            params = optim.apply_updates(params, updates)
    return {k: v.detach() for k, v in params.items()}, state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_apply_gradients_is_torch_s_step_bit_for_bit(name, kwargs, dtype):
    params = make_params(name, dtype)
    seq = grad_sequence(params)
    expected, _, _ = run_torch(name, kwargs, params, seq, **implementation(name))
    actual, _ = run_functional(getattr(optim, name)(**kwargs), params, seq, "fused")
    assert_trees_close(actual, expected, **EXACT)


@pytest.mark.parametrize("path", ["update", "traced"])
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_update_and_traced_paths_match_torch_float64(name, kwargs, path):
    params = make_params(name)
    seq = grad_sequence(params)
    expected, _, _ = run_torch(name, kwargs, params, seq, **implementation(name))
    actual, _ = run_functional(getattr(optim, name)(**kwargs), params, seq, path)
    assert_trees_close(actual, expected, **F64)


# torch's default CPU step is its single-tensor loop, which rounds some steps differently
# from its foreach step. ASGD's loop computes eta in float64 and rounds it to float32 once,
# its foreach step computes it in float32: up to 1.5e-7 apart after 50 steps (torch's own
# two implementations).
DEFAULT_TOL = {"asgd": {"rtol": 1e-7, "atol": 1e-7}}


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_matches_torch_s_default_for_loop_step(name, kwargs):
    params = make_params(name)
    seq = grad_sequence(params)
    expected, _, _ = run_torch(name, kwargs, params, seq)
    actual, _ = run_functional(getattr(optim, name)(**kwargs), params, seq, "fused")
    assert_trees_close(actual, expected, **DEFAULT_TOL.get(name, {"rtol": 1e-10, "atol": 1e-10}))


#: (our state type, field) -> torch's state key, per optimiser.
BUFFERS = {
    "nadam": (optim.NAdamState, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}),
    "radam": (optim.RAdamState, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}),
    "adamax": (optim.AdamaxState, {"exp_avg": "exp_avg", "exp_inf": "exp_inf"}),
    "adadelta": (optim.AdadeltaState, {"square_avg": "square_avg", "acc_delta": "acc_delta"}),
    "asgd": (optim.ASGDState, {"ax": "ax"}),
    "rprop": (optim.RpropState, {"prev": "prev", "step_size": "step_size"}),
    "adafactor": (
        optim.AdafactorState,
        {"row_var": "row_var", "col_var": "col_var", "variance": "variance"},
    ),
    "muon": (optim.MuonState, {"momentum_buffer": "momentum_buffer"}),
}


@pytest.mark.parametrize("name", list(BUFFERS))
def test_state_matches_torch_s_state_bit_for_bit(name):
    kwargs = next(k for n, k in CASES if n == name and k)  # a case with options
    params = make_params(name)
    seq = grad_sequence(params, steps=12)
    _, torch_opt, tensors = run_torch(name, kwargs, params, seq, **implementation(name))
    _, state = run_functional(getattr(optim, name)(**kwargs), params, seq, "fused")
    state_type, fields = BUFFERS[name]
    (ours,) = [s for s in state if isinstance(s, state_type)]
    for field, key in fields.items():
        theirs = {
            k: torch_opt.state[t][key]
            for k, t in zip(params, tensors, strict=True)
            if key in torch_opt.state[t]
        }
        tree = getattr(ours, field)
        # Where torch keeps no such key (Adafactor's unfactored leaves) ours is empty.
        assert all(tree[k].numel() == 0 for k in tree if k not in theirs), field
        assert_trees_close({k: tree[k] for k in theirs}, theirs, **EXACT)
    assert int(ours.count) == 12
    if name == "nadam":  # torch keeps mu_product per param, all equal, in float32
        assert torch.equal(ours.mu_product, torch_opt.state[tensors[0]]["mu_product"])
    if name == "asgd":
        for field in ("eta", "mu"):
            assert torch.equal(getattr(ours, field), torch_opt.state[tensors[0]][field]), field


@pytest.mark.parametrize("name", list(BUFFERS))
def test_schedule_lr_matches_torch_scheduler(name):
    """``lr`` as a schedule is the lr_scheduler's lr at each step (ExponentialLR here, whose
    recursive product is the closed form to a few ulps); Rprop reads it once, as torch."""
    params = make_params(name)
    seq = grad_sequence(params, steps=20)
    tensors = [nn.Parameter(v.clone()) for v in params.values()]
    torch_opt = TORCH[name](tensors, lr=0.02, **implementation(name))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(torch_opt, gamma=0.9)
    for grads in seq:
        for t, g in zip(tensors, grads.values(), strict=True):
            t.grad = g.clone()
        torch_opt.step()
        scheduler.step()
    opt = getattr(optim, name)(lr=optim.exponential_lr(0.02, gamma=0.9))
    actual, state = run_functional(opt, params, seq, "fused")
    expected = {k: t.detach() for k, t in zip(params, tensors, strict=True)}
    assert_trees_close(actual, expected, rtol=1e-12, atol=1e-14)
    assert float(optim.current_lr(state)) == pytest.approx(torch_opt.param_groups[0]["lr"])


@pytest.mark.parametrize("path", ["update", "fused"])
@pytest.mark.parametrize("name", list(BUFFERS))
def test_steps_are_pure(name, path):
    """Nothing passed in is written to, and nothing returned carries autograd history."""
    kwargs = next(k for n, k in CASES if n == name and k)
    opt = getattr(optim, name)(**kwargs)
    params = make_params(name)
    grads = grad_sequence(params, steps=1)[0]
    _, state = opt.update(grads, opt.init(params), params)  # non-initial buffers
    before = tree_clone((params, grads, state))
    if path == "fused":
        out = optim.apply_gradients(opt, grads, state, params)
    else:
        out = opt.update(grads, state, params)
    assert_trees_close((params, grads, state), before, **EXACT)
    for leaf in tree_leaves(out):
        assert leaf.grad_fn is None and not leaf.requires_grad


@pytest.mark.parametrize("name", list(BUFFERS))
def test_step_is_differentiable_under_autograd(name):
    """Where autograd records, the step is torch ops on tensors: d sum(new params) / d p is
    the derivative of the update rule (here checked finite and the right shape) and the
    numbers are those of the eager step (the traced-path parity test shows how close)."""
    opt = getattr(optim, name)()
    params = {k: v.clone().requires_grad_() for k, v in make_params(name).items()}
    grads = grad_sequence(params, steps=1)[0]
    new, _ = optim.apply_gradients(
        opt, {k: g.detach() for k, g in grads.items()}, opt.init(params), params
    )
    sum(v.sum() for v in new.values()).backward()
    for k, v in params.items():
        assert v.grad is not None and v.grad.shape == v.shape and torch.isfinite(v.grad).all(), k


#: Adafactor (per-leaf norms, factored moments) and Muon (per-matrix orthogonalisation)
#: mix the elements of a leaf, so a stacked ensemble would mix its members.
ELEMENTWISE = [n for n in BUFFERS if n not in ("adafactor", "muon")]


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_stepping_a_stacked_ensemble_steps_each_member(name):
    """``make_ensemble_train_step``'s contract (it runs the optimiser once on the stacked
    trees): for an element-wise optimiser the stack's step is each member's step."""
    opt = getattr(optim, name)()
    members = [{k: v + i for k, v in make_params(name).items()} for i in range(3)]
    grads = [grad_sequence(m, steps=1, seed=i + 5)[0] for i, m in enumerate(members)]
    loop = [
        optim.apply_gradients(opt, g, opt.init(m), m)[0]
        for m, g in zip(members, grads, strict=True)
    ]
    params = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    stacked_grads = {k: torch.stack([g[k] for g in grads]) for k in grads[0]}
    new, _ = optim.apply_gradients(opt, stacked_grads, opt.init(params), params)
    for i, expected in enumerate(loop):
        assert_trees_close({k: v[i] for k, v in new.items()}, expected, **EXACT)


@pytest.mark.parametrize("name", list(BUFFERS))
def test_compiled_step_is_one_graph_without_recompiling(name):
    """Under ``torch.compile`` the step's numbers are tensors (no Python branch on the step,
    no ``.item()``): one graph, no break, no recompile across steps with a scheduled lr, and
    the eager step's params to 1e-12. (Dynamo's eager backend: the trace is what is tested.)"""
    torch._dynamo.reset()
    opt = getattr(optim, name)(lr=optim.exponential_lr(0.01, gamma=0.9))
    params = make_params(name)
    compiled = torch.compile(
        lambda g, s, p: optim.apply_gradients(opt, g, s, p), backend="eager", fullgraph=True
    )
    eager, eager_state = params, opt.init(params)
    traced, traced_state = params, opt.init(params)
    with dynamo_counts() as seen, torch._dynamo.config.patch(error_on_recompile=True):
        for grads in grad_sequence(params, steps=4):
            eager, eager_state = optim.apply_gradients(opt, grads, eager_state, eager)
            traced, traced_state = compiled(grads, traced_state, traced)
    assert seen == {"graphs": 1, "breaks": 0}
    assert_trees_close(traced, eager, **F64)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), ()])
def test_muon_refuses_a_non_matrix_naming_the_leaf(shape):
    opt = optim.muon()
    params = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(shape)}
    with pytest.raises(ValueError, match=r"muon takes only 2-D params, but 'fc.bias' has shape"):
        opt.init(params)
    state = opt.init({"fc.weight": torch.ones(2, 2)})
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    with pytest.raises(ValueError, match=r"'fc\.bias'"):
        optim.apply_gradients(opt, grads, state, params)


def test_muon_with_adamw_for_the_rest_matches_torch_s_two_optimisers():
    """torch's documented Muon recipe (Muon for matrices, AdamW for the others) as one
    ``multi_transform``."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    seq = [
        {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
        for _ in range(10)
    ]
    matrices = [p for p in net.parameters() if p.ndim == 2]
    others = [p for p in net.parameters() if p.ndim != 2]
    torch_opts = [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(others, lr=3e-4)]
    for grads in seq:
        for k, p in net.named_parameters():
            p.grad = grads[k].clone()
        for o in torch_opts:
            o.step()
    opt = optim.multi_transform(
        {"muon": optim.muon(lr=0.02), "adamw": optim.adamw(lr=3e-4)},
        lambda path, leaf: "muon" if leaf.ndim == 2 else "adamw",
    )
    actual, _ = run_functional(opt, params, seq, "fused")
    assert_trees_close(actual, dict(net.named_parameters()), **F64)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("nadam", {"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0"),
        ("nadam", {"momentum_decay": -1.0}, "Invalid momentum_decay"),
        ("radam", {"eps": -1.0}, "Invalid epsilon"),
        ("adamax", {"weight_decay": -1.0}, "Invalid weight_decay"),
        ("adadelta", {"rho": 1.5}, "Invalid rho"),
        ("asgd", {"lr": -1.0}, "Invalid learning rate"),
        ("rprop", {"etas": (1.5, 1.2)}, "Invalid eta values"),
        ("adafactor", {"d": 0.5}, "Clipping threshold d"),
        ("adafactor", {"beta2_decay": 0.5}, "beta2_decay should be <= 0"),
        ("muon", {"adjust_lr_fn": "bogus"}, "bogus is not supported"),
    ],
)
def test_bad_options_are_refused_as_torch_refuses_them(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(optim, name)(**kwargs)
    with pytest.raises(ValueError, match=message):
        TORCH[name]([nn.Parameter(torch.ones(2, 2))], **kwargs)


def test_update_without_params_is_a_clear_error():
    opt = optim.nadam()
    params = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="nadam needs params"):
        opt.update(params, opt.init(params))
