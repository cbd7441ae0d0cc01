"""``assert_trees_close``: the one parity check every test (and user) compares trees with.

Example:
    >>> import torch
    >>> from functorch_diary.testing import assert_trees_close
    >>> assert_trees_close({"w": torch.ones(2)}, {"w": torch.ones(2) + 1e-9}, rtol=1e-6)
    >>> assert_trees_close({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    Traceback (most recent call last):
    ...
    AssertionError: leaf 'w': max abs diff 1 (max rel diff 1) exceeds atol=0 + rtol=0 * |expected|
    >>> assert_trees_close({"w": torch.tensor([-0.0])}, {"w": torch.tensor([0.0])})
    Traceback (most recent call last):
    ...
    AssertionError: leaf 'w': signs differ (a -0.0 where +0.0 is expected?)
"""

from __future__ import annotations

import torch

from .tree import PyTree, tree_flatten_with_paths

__all__ = ["assert_trees_close"]


def assert_trees_close(
    actual: PyTree, expected: PyTree, *, rtol: float = 0.0, atol: float = 0.0
) -> None:
    """Assert two pytrees have the same paths, shapes, dtypes and devices, and close values.

    ``|actual - expected| <= atol + rtol * |expected|`` everywhere (NaNs must match).
    The defaults (0, 0) demand bit-for-bit equality, signed zeros included (``-0.0`` is
    not ``+0.0``). Non-tensor leaves must be equal.

    Raises:
        AssertionError: naming the first leaf path that differs and by how much.
    """
    got, want = tree_flatten_with_paths(actual), tree_flatten_with_paths(expected)
    got_paths, want_paths = [p for p, _ in got], [p for p, _ in want]
    if got_paths != want_paths:
        only_got = sorted(set(got_paths) - set(want_paths))
        only_want = sorted(set(want_paths) - set(got_paths))
        raise AssertionError(
            f"trees differ: only in actual {only_got}, only in expected {only_want}"
        )
    for (path, a), (_, b) in zip(got, want, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if a != b:
                raise AssertionError(f"leaf {path!r}: {a!r} != {b!r}")
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            raise AssertionError(
                f"leaf {path!r}: shape/dtype {tuple(a.shape)} {a.dtype} "
                f"vs {tuple(b.shape)} {b.dtype}"
            )
        if a.device != b.device:
            raise AssertionError(f"leaf {path!r}: device {a.device} vs {b.device}")
        if a.is_meta:
            continue  # meta tensors carry shapes only: there are no values to compare
        a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
        if not torch.equal(a64.isnan(), b64.isnan()):
            raise AssertionError(f"leaf {path!r}: NaNs in different places")
        if atol == 0 and rtol == 0 and not torch.equal(a64.signbit(), b64.signbit()):
            raise AssertionError(f"leaf {path!r}: signs differ (a -0.0 where +0.0 is expected?)")
        # Equal entries (infinities included) differ by 0; NaN positions were checked above.
        diff = torch.where((a64 == b64) | a64.isnan(), 0.0, (a64 - b64).abs())
        bound = atol + rtol * b64.abs()
        if bool((diff > bound).any()):
            rel = (diff / b64.abs().clamp_min(1e-300)).max()
            raise AssertionError(
                f"leaf {path!r}: max abs diff {diff.max().item():.3g} "
                f"(max rel diff {rel.item():.3g}) "
                f"exceeds atol={atol:g} + rtol={rtol:g} * |expected|"
            )
