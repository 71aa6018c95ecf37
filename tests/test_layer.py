"""The BatchNorm layer: modes, flags, state dict, files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import close, make

import numbn
from numbn import _reference as ref


def test_train_eval_modes(rng):
    bn = numbn.BatchNorm(3)
    assert bn.training
    x = make(rng, (8, 3, 4), np.float32)
    bn(x)
    assert bn.num_batches_tracked == 1
    before = bn.state_dict()
    bn.eval()
    assert not bn.training
    y = bn(x)
    close(y, ref.normalize(x, bn.running_mean, bn.running_var, eps=bn.eps), np.float32)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert bn.train() is bn and bn.training


def test_eval_backward_is_inference_form(rng):
    bn = numbn.BatchNorm(3, dtype=np.float64)
    bn.running_mean[:] = [0.5, -0.5, 1.0]
    bn.running_var[:] = [2.0, 0.5, 1.0]
    bn.weight[:] = [1.5, 2.0, -1.0]
    bn.eval()
    x = make(rng, (5, 3, 2), np.float64)
    dy = make(rng, (5, 3, 2), np.float64, 0, 1)
    bn(x)
    dx = bn.backward(dy)
    invstd = 1 / np.sqrt(bn.running_var + bn.eps)
    close(dx, dy * (bn.weight * invstd)[None, :, None], np.float64)
    close(bn.grad_bias, dy.sum((0, 2)), np.float64)


def test_no_running_stats_uses_batch_statistics_in_eval(rng):
    bn = numbn.BatchNorm(3, track_running_stats=False).eval()
    assert bn.running_mean is None and bn.num_batches_tracked is None
    x = make(rng, (6, 3), np.float32)
    close(bn(x), ref.forward_train(x)[0], np.float32)
    assert set(bn.state_dict()) == {"weight", "bias"}


def test_not_affine(rng):
    bn = numbn.BatchNorm(2, affine=False)
    assert bn.weight is None and bn.bias is None
    x = make(rng, (6, 2), np.float32)
    bn(x)
    bn.backward(np.ones_like(x))
    assert bn.grad_weight is None and bn.grad_bias is None
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


def test_resets(rng):
    bn = numbn.BatchNorm(2)
    bn(make(rng, (6, 2), np.float32))
    bn.weight[:] = 3
    bn.reset_running_stats()
    assert bn.num_batches_tracked == 0 and (bn.running_var == 1).all() and (bn.weight == 3).all()
    bn.reset_parameters()
    assert (bn.weight == 1).all() and (bn.bias == 0).all()


def test_state_dict_round_trip_and_copies(rng):
    bn = numbn.BatchNorm(4, convention="keras")
    bn(make(rng, (6, 4), np.float32))
    state = bn.state_dict()
    state["running_mean"][:] = 99  # a copy: the layer is not changed
    assert not (bn.running_mean == 99).any()
    other = numbn.BatchNorm(4, convention="keras")
    other.load_state_dict(bn.state_dict())
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k], v)


@pytest.mark.parametrize("change,pattern", [
    (lambda s: s.pop("running_var"), "missing"),
    (lambda s: s.update(extra=np.zeros(3)), "unexpected"),
    (lambda s: s.update(weight=np.zeros(4)), "weight must have shape"),
    (lambda s: s.update(bias=np.zeros(3, np.int32)), "floating"),
    (lambda s: s.update(num_batches_tracked=np.array(1.5)), "integer"),
])
def test_bad_state_leaves_layer_untouched(change, pattern, rng):
    bn = numbn.BatchNorm(3)
    bn(make(rng, (6, 3), np.float32))
    before = bn.state_dict()
    state = bn.state_dict()
    state["running_mean"] = state["running_mean"] + 1  # a good change beside a bad one
    change(state)
    with pytest.raises(ValueError, match=pattern):
        bn.load_state_dict(state)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_save_load_npz(tmp_path, rng):
    bn = numbn.BatchNorm(3, convention="paddle")
    bn(make(rng, (6, 3, 2), np.float32))
    path = tmp_path / "bn.npz"
    bn.save(path)
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == sorted(bn.state_dict())
    other = numbn.BatchNorm(3, convention="paddle")
    other.load(path)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k], v)


def test_constructor_errors():
    with pytest.raises(ValueError, match="positive integer"):
        numbn.BatchNorm(0)
    with pytest.raises(TypeError, match="dtype"):
        numbn.BatchNorm(3, dtype=np.int32)


def test_repr():
    assert "convention='flax'" in repr(numbn.BatchNorm(3, convention="flax"))
