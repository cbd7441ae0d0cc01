"""Pytree helpers: round trips, arithmetic against per-leaf loops, one selection helper."""

import fnmatch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from functorch_diary import tree
from functorch_diary.testing import assert_trees_close

NAMES = st.lists(
    st.from_regex(r"[a-c]{1,2}(\.[0-2a-c]{1,2}){0,2}", fullmatch=True),
    min_size=1,
    max_size=6,
    unique=True,
)
SHAPES = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


@st.composite
def param_dicts(draw):
    names = draw(NAMES)
    return {name: torch.randn(draw(SHAPES), dtype=torch.float64) for name in names}


@st.composite
def nested_trees(draw):
    leaf = st.builds(lambda shape: torch.randn(shape), SHAPES)
    return draw(
        st.recursive(
            leaf,
            lambda children: st.one_of(
                st.dictionaries(st.sampled_from("xyz"), children, min_size=1, max_size=3),
                st.lists(children, min_size=1, max_size=3).map(tuple),
            ),
            max_leaves=8,
        )
    )


@settings(max_examples=60)
@given(nested_trees())
def test_flatten_unflatten_round_trip(t):
    leaves = tree.tree_leaves(t)
    assert_trees_close(tree.tree_unflatten_like(t, leaves), t)
    assert [leaf for _, leaf in tree.tree_flatten_with_paths(t)] == leaves
    assert len(set(tree.tree_paths(t))) == len(leaves)


@settings(max_examples=40)
@given(param_dicts(), st.floats(-3, 3))
def test_arithmetic_matches_per_leaf_loop(params, alpha):
    other = {k: torch.randn_like(v) for k, v in params.items()}
    before = tree.tree_clone((params, other))
    assert_trees_close(
        tree.tree_add(params, other, alpha=alpha),
        {k: params[k] + alpha * other[k] for k in params},
        rtol=1e-12,
        atol=1e-12,
    )
    assert_trees_close(tree.tree_sub(params, other), {k: params[k] - other[k] for k in params})
    assert_trees_close(tree.tree_scale(params, alpha), {k: params[k] * alpha for k in params})
    assert_trees_close(
        tree.tree_zeros_like(params), {k: torch.zeros_like(v) for k, v in params.items()}
    )
    assert_trees_close((params, other), before)  # pure


@settings(max_examples=40)
@given(param_dicts())
def test_global_norm_matches_clip_grad_norm(params):
    grads = [torch.nn.Parameter(torch.zeros_like(v)) for v in params.values()]
    for p, v in zip(grads, params.values(), strict=True):
        p.grad = v.clone()
    expected = torch.nn.utils.clip_grad_norm_(grads, max_norm=float("inf"))
    assert_trees_close(tree.tree_global_norm(params), expected, rtol=1e-12)


@settings(max_examples=60)
@given(
    param_dicts(),
    st.lists(
        st.from_regex(r"[a-c*?]{1,3}(\.[0-2a-c*]{1,2})?", fullmatch=True), min_size=1, max_size=3
    ),
)
def test_select_by_patterns_agrees_with_a_loop_over_names(params, patterns):
    expected = {k: any(fnmatch.fnmatchcase(k, p) for p in patterns) for k in params}
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in params)]
    if unmatched:
        with pytest.raises(ValueError, match="matches no leaf"):
            tree.select(params, patterns)
    else:
        assert tree.select(params, patterns) == expected


@settings(max_examples=40)
@given(param_dicts(), st.data())
def test_select_by_predicate_and_mask_agree_with_a_loop(params, data):
    mask = {k: data.draw(st.booleans()) for k in params}
    assert tree.select(params, mask) == mask
    assert tree.select(params, lambda path, leaf: mask[path]) == mask
    assert tree.select(params, lambda path, leaf: leaf.dim() == 2) == {
        k: v.dim() == 2 for k, v in params.items()
    }
    chosen, rest = tree.partition(params, mask)
    assert_trees_close(tree.combine(chosen, rest), params)
    assert sorted(k for k, v in chosen.items() if v is not None) == sorted(
        k for k in mask if mask[k]
    )


def test_select_errors_are_clear():
    params = {"features.0.weight": torch.ones(1), "classifier.weight": torch.ones(1)}
    with pytest.raises(ValueError, match=r"'featurs\.\*' matches no leaf; paths look like"):
        tree.select(params, "featurs.*")
    with pytest.raises(ValueError, match="mask tree does not match"):
        tree.select(params, {"features.0.weight": True})


def test_paths_of_named_tuples_use_field_names():
    from functorch_diary import TrainState

    ts = TrainState({"w": torch.ones(1)}, {}, (), torch.tensor(0), torch.tensor(0))
    assert tree.tree_paths(ts) == ["params.w", "step", "rng"]
