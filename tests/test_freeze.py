"""BatchNorm.freeze(): Keras's ``trainable = False`` for fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_TORCH, close, requires_torch

import numbn

if HAS_TORCH:
    import torch

needs_torch = requires_torch
CONVENTIONS = sorted(numbn.CONVENTIONS)


def pretrained(convention="torch", c=4, activation=None, seed=0):
    rng = np.random.default_rng(seed)
    bn = numbn.BatchNorm(c, convention=convention, dtype=np.float64, activation=activation)
    bn.running_mean[...] = rng.normal(0.0, 1.0, c)
    bn.running_var[...] = rng.uniform(0.5, 2.0, c)
    bn.weight[...] = rng.normal(1.0, 0.3, c)
    bn.bias[...] = rng.normal(0.0, 0.3, c)
    bn.num_batches_tracked = 100
    return bn


def data(bn, seed=1):
    rng = np.random.default_rng(seed)
    shape = (6, bn.num_features, 3) if bn.axis == 1 else (6, 3, bn.num_features)
    return rng.normal(0.5, 2.0, shape), rng.standard_normal(shape)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_frozen_layer_is_the_inference_form_in_training_mode(convention, activation):
    bn = pretrained(convention, activation=activation)
    x, dy = data(bn)
    state = bn.state_dict()
    calls = []
    bn._observer = lambda *args: calls.append(args)
    assert bn.freeze() is bn and bn.frozen and bn.training
    y = bn(x)
    dx = bn.backward(dy)
    # Same as the functions in inference form, with the running statistics.
    expected = numbn.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                eps=bn.eps, axis=bn.axis, activation=activation)
    close(y, expected, np.float64)
    invstd = 1.0 / np.sqrt(bn.running_var + bn.eps)
    expected_dx, _, _ = numbn.batch_norm_backward(dy, x, bn.running_mean, invstd, bn.weight,
                                                  bias=bn.bias, training=False, axis=bn.axis,
                                                  activation=activation)
    close(dx, expected_dx, np.float64)
    # Nothing updated: statistics, counter, parameters; no gradients; no observer call.
    after = bn.state_dict()
    for key, value in state.items():
        np.testing.assert_array_equal(after[key], value)
    assert bn.grad_weight is None and bn.grad_bias is None
    assert calls == []
    # Eval mode behaves the same while frozen.
    bn.eval()
    np.testing.assert_array_equal(bn(x), y)
    assert bn.grad_weight is None


def test_unfreeze_restores_training():
    bn = pretrained()
    x, dy = data(bn)
    bn.freeze()
    bn(x)
    bn.backward(dy)
    assert bn.unfreeze() is bn and not bn.frozen
    rm = bn.running_mean.copy()
    y = bn(x)
    dx = bn.backward(dy)
    assert bn.num_batches_tracked == 101 and not np.array_equal(bn.running_mean, rm)
    plain = pretrained()
    np.testing.assert_array_equal(y, plain(x))
    np.testing.assert_array_equal(dx, plain.backward(dy))
    np.testing.assert_array_equal(bn.grad_weight, plain.grad_weight)
    np.testing.assert_array_equal(bn.grad_bias, plain.grad_bias)


def test_frozen_flag_is_per_layer_and_not_in_the_state():
    a, b = numbn.BatchNorm(3).freeze(), numbn.BatchNorm(3)
    assert a.frozen and not b.frozen
    assert "frozen" not in a.state_dict()


def test_freeze_without_running_statistics_is_an_error():
    bn = numbn.BatchNorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        bn.freeze()
    assert not bn.frozen


@needs_torch
@pytest.mark.parametrize("activation", [None, "relu"])
def test_frozen_layer_matches_torch_eval_without_grad(activation):
    # PyTorch's way of freezing: eval() and requires_grad_(False).
    bn = pretrained(activation=activation)
    x, dy = data(bn)
    tbn = torch.nn.BatchNorm1d(4, dtype=torch.float64)
    tbn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})
    tbn.eval().requires_grad_(False)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = tbn(xt)
    if activation == "relu":
        yt = torch.relu(yt)
    yt.backward(torch.from_numpy(dy))
    bn.freeze()
    close(bn(x), yt.detach().numpy(), np.float64)
    close(bn.backward(dy), xt.grad.numpy(), np.float64)
    assert tbn.weight.grad is None and bn.grad_weight is None


# -- a short fine-tuning loop ----------------------------------------------------------

def finetune_numbn(x, target, w1, w2, bn, steps, lr):
    """linear -> frozen BatchNorm+ReLU -> linear, MSE loss, plain SGD on every
    parameter that has a gradient; returns the losses."""
    losses = []
    params = {"w1": w1, "w2": w2, "bn.weight": bn.weight, "bn.bias": bn.bias}
    for _ in range(steps):
        h = x @ w1.T
        a = bn(h)
        out = a @ w2.T
        diff = out - target
        losses.append(float(np.mean(diff ** 2)))
        d_out = 2.0 * diff / diff.size
        grads = {"w2": d_out.T @ a}
        d_h = bn.backward(d_out @ w2)
        grads["w1"] = d_h.T @ x
        grads["bn.weight"], grads["bn.bias"] = bn.grad_weight, bn.grad_bias
        for name, g in grads.items():
            if g is not None:
                params[name] -= lr * g
    return losses


def test_finetuning_loop_leaves_frozen_layer_alone():
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 2.0, (32, 5))
    target = rng.standard_normal((32, 1))
    w1, w2 = rng.standard_normal((4, 5)) * 0.5, rng.standard_normal((1, 4)) * 0.5
    bn = pretrained(activation="relu", seed=3).freeze()
    state = bn.state_dict()
    losses = finetune_numbn(x, target, w1, w2, bn, steps=30, lr=0.05)
    assert losses[-1] < 0.7 * losses[0]
    after = bn.state_dict()
    for key, value in state.items():
        np.testing.assert_array_equal(after[key], value)


@needs_torch
def test_finetuning_loop_matches_torch():
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 2.0, (16, 5))
    target = rng.standard_normal((16, 1))
    w1, w2 = rng.standard_normal((4, 5)) * 0.5, rng.standard_normal((1, 4)) * 0.5
    bn = pretrained(activation="relu", seed=5).freeze()

    tbn = torch.nn.BatchNorm1d(4, dtype=torch.float64)
    tbn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})
    tbn.eval().requires_grad_(False)
    tw1 = torch.from_numpy(w1.copy()).requires_grad_(True)
    tw2 = torch.from_numpy(w2.copy()).requires_grad_(True)
    opt = torch.optim.SGD([tw1, tw2], lr=0.05)
    xt, tt = torch.from_numpy(x), torch.from_numpy(target)
    torch_losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = torch.mean((torch.relu(tbn(xt @ tw1.T)) @ tw2.T - tt) ** 2)
        torch_losses.append(float(loss.detach()))
        loss.backward()
        opt.step()

    losses = finetune_numbn(x, target, w1, w2, bn, steps=10, lr=0.05)
    close(losses, torch_losses, np.float64)
    close(w1, tw1.detach().numpy(), np.float64)
    close(w2, tw2.detach().numpy(), np.float64)
