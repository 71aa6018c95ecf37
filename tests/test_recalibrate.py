"""recalibrate: exact population statistics of everything seen in the block."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL

import numbn

CONVENTIONS = sorted(numbn.CONVENTIONS)
#: recalibrate's contract in float64: the statistics of the concatenated data to
#: 1e-12, relative (tighter than conftest's generic float64 tolerance).
EXACT = 1e-12


def shifted_batches(rng, channels_last=False, c=3, sizes=(4, 7, 2, 5), dtype=np.float64):
    """Batches whose means differ widely, so averaging per-batch variances is wrong."""
    out = []
    for k, n in enumerate(sizes):
        x = rng.normal(10.0 * k - 15.0, 1.0 + k, size=(n, c, 3, 2))
        out.append(np.moveaxis(x, 1, -1).copy() if channels_last else x)
    return [b.astype(dtype) for b in out]


def population(batches, axis, unbiased):
    """Mean and variance of the concatenated batches, per channel (float64)."""
    flat = np.concatenate([np.moveaxis(np.asarray(b, np.float64), axis, -1).reshape(
        -1, b.shape[axis]) for b in batches])
    return flat.mean(axis=0), flat.var(axis=0, ddof=1 if unbiased else 0)


def assert_stats(bn, mean, var):
    tol = EXACT if bn.dtype == np.float64 else TOL[bn.dtype][0]
    assert bn.running_mean.dtype == bn.dtype and bn.running_var.dtype == bn.dtype
    np.testing.assert_allclose(bn.running_mean, mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(bn.running_var, var, rtol=tol, atol=0)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_statistics_of_the_concatenated_data(convention):
    rng = np.random.default_rng(0)
    bn = numbn.BatchNorm(3, convention=convention, dtype=np.float64).eval()
    bn.running_mean[...] = 100.0
    axis = bn.axis
    batches = shifted_batches(rng, channels_last=axis == -1)
    unbiased = convention == "torch"
    with numbn.recalibrate(bn):
        for b in batches:
            bn(b)
    mean, var = population(batches, axis, unbiased)
    assert_stats(bn, mean, var)
    # fvcore-style precise BN (the average of per-batch variances) is far off here,
    # so the comparison above tells exact merging apart from averaging.
    averaged = np.mean([population([b], axis, unbiased)[1] for b in batches], axis=0)
    assert np.all(np.abs(averaged - var) > 0.1 * var)
    assert bn.num_batches_tracked == len(batches)
    assert not bn.training


def test_cumulative_momentum_and_float32_layer():
    rng = np.random.default_rng(1)
    bn = numbn.BatchNorm(3, momentum=None)
    bn.num_batches_tracked = 40
    batches = shifted_batches(rng, dtype=np.float32)
    with numbn.recalibrate(bn):
        for b in batches:
            bn(b)
    assert_stats(bn, *population(batches, 1, unbiased=True))
    assert bn.momentum is None and bn.num_batches_tracked == len(batches) and bn.training


def test_running_stats_untouched_by_per_batch_updates_inside_the_block():
    rng = np.random.default_rng(2)
    bn = numbn.BatchNorm(3, dtype=np.float64)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    with numbn.recalibrate(bn):
        for b in shifted_batches(rng):
            y = bn(b)
            np.testing.assert_array_equal(bn.running_mean, rm)
            np.testing.assert_array_equal(bn.running_var, rv)
            # Inside the block the layer normalises with the batch statistics.
            assert abs(float(y.mean())) < 1e-12


def test_several_layers_at_once():
    rng = np.random.default_rng(3)
    first = numbn.BatchNorm(3, dtype=np.float64, activation="relu").eval()
    second = numbn.BatchNorm(3, convention="keras", axis=1, dtype=np.float64).eval()
    third = numbn.BatchNorm(3, dtype=np.float64).eval()  # never reached in the block
    third.running_mean[...] = 7.0
    first.weight[...] = [1.0, 2.0, 3.0]
    first.bias[...] = [0.5, 0.0, -0.5]
    batches = shifted_batches(rng)
    seen_by_second = []

    def model(x):
        h = first(x) * 2.0 + 1.0
        seen_by_second.append(h)
        return second(h)

    with numbn.recalibrate([first, second, third, first]):
        for b in batches:
            model(b)
    assert_stats(first, *population(batches, 1, unbiased=True))
    assert_stats(second, *population(seen_by_second, 1, unbiased=False))
    assert first.num_batches_tracked == second.num_batches_tracked == len(batches)
    np.testing.assert_array_equal(third.running_mean, 7.0)
    assert third.num_batches_tracked == 0


def test_modes_momentum_observer_and_frozen_state_restored():
    rng = np.random.default_rng(4)
    calls = []

    def observer(layer, mean, var, count):
        calls.append(count)

    a = numbn.BatchNorm(3, momentum=0.3).eval()
    b = numbn.BatchNorm(3, convention="paddle", axis=1).train().freeze()
    a._observer = observer
    with numbn.recalibrate((a, b)):
        for x in shifted_batches(rng):
            a(x)
            b(x)
    assert (a.training, a.momentum, a._observer, a.frozen) == (False, 0.3, observer, False)
    assert (b.training, b.momentum, b._observer, b.frozen) == (True, 0.9, None, True)
    assert calls == [x.size // 3 for x in shifted_batches(np.random.default_rng(4))]
    # The frozen layer was recalibrated too, and is frozen again afterwards.
    assert b.num_batches_tracked == 4
    rm = b.running_mean.copy()
    b(x)
    np.testing.assert_array_equal(b.running_mean, rm)


def test_exception_leaves_layers_as_they_were():
    rng = np.random.default_rng(5)
    bn = numbn.BatchNorm(3, momentum=None).eval()
    other = numbn.BatchNorm(3, convention="flax", axis=1).freeze()
    warmup = shifted_batches(rng)[0]
    bn.train()(warmup)
    bn.backward(np.ones_like(warmup))
    bn.eval()
    before = [(layer.state_dict(), layer.training, layer.momentum, layer._observer,
               layer.frozen, layer._saved, layer.grad_weight, layer.grad_bias)
              for layer in (bn, other)]
    arrays = [(layer.running_mean, layer.running_var) for layer in (bn, other)]
    with pytest.raises(RuntimeError, match="boom"):
        with numbn.recalibrate([bn, other]):
            for x in shifted_batches(rng):
                bn(x)
                other(x)
            raise RuntimeError("boom")
    for layer, (state, training, momentum, observer, frozen, saved, gw, gb), (rm, rv) in zip(
            (bn, other), before, arrays, strict=True):
        after = layer.state_dict()
        for key, value in state.items():
            np.testing.assert_array_equal(after[key], value)
        assert (layer.training, layer.momentum, layer._observer, layer.frozen) == (
            training, momentum, observer, frozen)
        assert layer._saved is saved and layer.grad_weight is gw and layer.grad_bias is gb
        # Restored in place: arrays the caller holds see the old values too.
        assert layer.running_mean is rm and layer.running_var is rv


def test_layer_without_running_statistics_is_rejected_before_any_change():
    good = numbn.BatchNorm(3).eval()
    bad = numbn.BatchNorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        with numbn.recalibrate([good, bad]):
            pytest.fail("the block must not run")
    assert not good.training and good._observer is None


def test_layer_whose_running_statistics_are_none_is_rejected_before_any_change():
    """A layer with both running statistics set to None (batch statistics in
    every mode, as in PyTorch) has nothing to recalibrate: refused up front,
    the layers before it in the list untouched."""
    good = numbn.BatchNorm(3).eval()
    bad = numbn.BatchNorm(3)
    bad.running_mean = bad.running_var = None
    with pytest.raises(ValueError, match="set to None"):
        with numbn.recalibrate([good, bad]):
            pytest.fail("the block must not run")
    assert not good.training and good._observer is None and good.momentum == 0.1
    assert bad.running_mean is None and bad.running_var is None


def test_running_statistics_replaced_in_the_block_are_put_back():
    """A block that replaces a layer's running statistics (here by None, then
    raises) leaves the layer with its own arrays and values again."""
    rng = np.random.default_rng(8)
    bn = numbn.BatchNorm(3).eval()
    bn.running_mean[...] = [1.0, 2.0, 3.0]
    rm, rv = bn.running_mean, bn.running_var
    with pytest.raises(RuntimeError, match="boom"):
        with numbn.recalibrate(bn):
            bn(shifted_batches(rng)[0])
            bn.running_mean = bn.running_var = None
            raise RuntimeError("boom")
    assert bn.running_mean is rm and bn.running_var is rv
    np.testing.assert_array_equal(rm, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(rv, np.ones(3))
    assert not bn.training and bn.momentum == 0.1


def test_not_a_layer_is_rejected():
    with pytest.raises(TypeError, match="BatchNorm"):
        with numbn.recalibrate([numbn.BatchNorm(3), "bn"]):
            pass


def test_nested_blocks_share_the_batches():
    rng = np.random.default_rng(6)
    bn = numbn.BatchNorm(3, dtype=np.float64).eval()
    batches = shifted_batches(rng)
    with numbn.recalibrate(bn):
        bn(batches[0])
        with numbn.recalibrate(bn):
            bn(batches[1])
        assert_stats(bn, *population(batches[1:2], 1, unbiased=True))
        assert bn.training
        bn(batches[2])
    assert_stats(bn, *population(batches[:3], 1, unbiased=True))
    assert not bn.training


def test_nested_block_that_raises_adds_nothing_to_the_outer_one():
    rng = np.random.default_rng(9)
    bn = numbn.BatchNorm(3, dtype=np.float64).eval()
    other = numbn.BatchNorm(3, dtype=np.float64).eval()
    batches = shifted_batches(rng)
    with numbn.recalibrate([bn, other]):
        bn(batches[0])
        other(batches[0])
        with pytest.raises(RuntimeError, match="boom"):
            with numbn.recalibrate(bn):
                bn(batches[1])
                raise RuntimeError("boom")
        with numbn.recalibrate(other):
            other(batches[1])
        bn(batches[2])
        other(batches[2])
    assert_stats(bn, *population(batches[0:3:2], 1, unbiased=True))
    assert_stats(other, *population(batches[:3], 1, unbiased=True))
    assert bn.num_batches_tracked == 2 and other.num_batches_tracked == 3


def test_an_infinity_gives_the_mean_of_all_the_data():
    """A batch whose channel holds +inf: the re-estimated mean of that channel
    is +inf, as the mean of everything seen is, not the NaN of inf - inf
    in the merge; the other channels are exact as usual."""
    rng = np.random.default_rng(1)
    bn = numbn.BatchNorm(3, dtype=np.float64)
    batches = [rng.standard_normal((6, 3)) for _ in range(3)]
    batches[1][2, 1] = np.inf
    with numbn.recalibrate(bn):
        for b in batches:
            bn(b)
    whole = np.concatenate(batches)
    assert np.isposinf(bn.running_mean[1]) and np.isnan(bn.running_var[1])
    rtol = TOL[np.dtype(np.float64)][0]
    finite = whole[:, [0, 2]]
    np.testing.assert_allclose(bn.running_mean[[0, 2]], finite.mean(0), rtol=rtol)
    np.testing.assert_allclose(bn.running_var[[0, 2]], finite.var(0, ddof=1), rtol=rtol)
