"""The keras, paddle and flax conventions against their documented update
formulas, and every convention's defaults."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import close, make

import numbn
from numbn import _reference as ref


@pytest.mark.parametrize("name,momentum,eps,axis,unbiased,new_weight", [
    ("torch", 0.1, 1e-5, 1, True, True),
    ("keras", 0.99, 1e-3, -1, False, False),
    ("paddle", 0.9, 1e-5, 1, False, False),
    ("flax", 0.99, 1e-5, -1, False, False),
])
def test_defaults(name, momentum, eps, axis, unbiased, new_weight):
    bn = numbn.BatchNorm(3, convention=name)
    assert (bn.momentum, bn.eps, bn.axis) == (momentum, eps, axis)
    conv = numbn.CONVENTIONS[name]
    assert (conv.unbiased_running_var, conv.momentum_is_new) == (unbiased, new_weight)
    np.testing.assert_array_equal(bn.weight, np.ones(3, np.float32))
    np.testing.assert_array_equal(bn.bias, np.zeros(3, np.float32))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3, np.float32))
    np.testing.assert_array_equal(bn.running_var, np.ones(3, np.float32))


@pytest.mark.parametrize("name", ["keras", "paddle", "flax"])
def test_old_value_momentum_and_biased_variance(name, rng):
    # Keras: moving = moving * momentum + batch * (1 - momentum), batch
    # variance biased (ops.moments); Paddle and Flax: the same form.
    bn = numbn.BatchNorm(4, convention=name, dtype=np.float64)
    rm, rv = np.zeros(4), np.ones(4)
    for step in range(4):
        x = make(rng, (5, 3, 3, 4) if bn.axis == -1 else (5, 4, 3, 3), np.float64, step, 2)
        y = bn(x)
        mean, var, _ = ref.batch_stats(x, bn.axis)
        rm = rm * bn.momentum + mean * (1 - bn.momentum)
        rv = rv * bn.momentum + var * (1 - bn.momentum)
        close(y, ref.normalize(x, mean, var, eps=bn.eps, axis=bn.axis), np.float64)
    close(bn.running_mean, rm, np.float64)
    close(bn.running_var, rv, np.float64)
    bn.eval()
    close(bn(x), ref.normalize(x, rm, rv, eps=bn.eps, axis=bn.axis), np.float64)


def test_torch_cumulative_average(rng):
    bn = numbn.BatchNorm(2, momentum=None, dtype=np.float64)
    batches = [make(rng, (6, 2), np.float64, k, 1) for k in range(5)]
    for x in batches:
        bn(x)
    means = np.mean([x.mean(0) for x in batches], axis=0)
    vars_ = np.mean([x.var(0, ddof=1) for x in batches], axis=0)
    close(bn.running_mean, means, np.float64)
    close(bn.running_var, vars_, np.float64)


def test_momentum_none_only_for_torch():
    with pytest.raises(ValueError, match="torch convention"):
        numbn.BatchNorm(3, convention="keras", momentum=None)


def test_unknown_convention():
    with pytest.raises(ValueError, match="unknown convention"):
        numbn.BatchNorm(3, convention="caffe")
