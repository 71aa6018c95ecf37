"""The keras, flax and paddle conventions against the frameworks themselves.

Each test runs three training steps and one eval step of a framework's
BatchNorm beside ``numbn.BatchNorm(convention=...)`` with the same
parameters, and compares y, dx, the weight and bias gradients and the
running statistics after every step. Keras runs on its PyTorch backend and
comes with the ``compare`` extra; Flax (``pip install flax``, with JAX) and
PaddlePaddle (``pip install paddlepaddle``) are large and skipped when they
are not installed: ``tests/test_conventions.py`` checks the documented
formulas without them.

float32 only: Keras 3 computes a float64 layer in float32, Flax keeps its
batch statistics in float32, Paddle rounds momentum and epsilon to float32
(numbn keeps float64 input in float64).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import close, make

import numbn

STEPS = 4  # three training steps, then one in eval mode


def _numbn_steps(convention, shape, axis, momentum, eps, gamma, beta, xs, dys):
    """y, dx, dweight, dbias, running mean and var of each step."""
    bn = numbn.BatchNorm(shape[axis], convention=convention, momentum=momentum, eps=eps,
                         axis=axis)
    bn.weight[...] = gamma
    bn.bias[...] = beta
    out = []
    for k, (x, dy) in enumerate(zip(xs, dys)):
        bn.train(k < STEPS - 1)
        y = bn(x)
        dx = bn.backward(dy)
        out.append([y, dx, bn.grad_weight.copy(), bn.grad_bias.copy(),
                    bn.running_mean.copy(), bn.running_var.copy()])
    return out


def _inputs(rng, shape, axis):
    c = shape[axis]
    gamma = (1 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    xs = [make(rng, shape, np.float32, mean=3.0, std=2.0) for _ in range(STEPS)]
    dys = [rng.standard_normal(shape).astype(np.float32) for _ in range(STEPS)]
    return gamma, beta, xs, dys


def _compare(ours, theirs, what):
    names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"]
    for k, (a, b) in enumerate(zip(ours, theirs)):
        for name, u, v in zip(names, a, b):
            # gradients sum over the batch: a looser absolute floor
            scale = 10 if name.startswith("d") else 1
            close(u, v, np.float32, scale=scale, err=f"{what}, step {k + 1}: {name}")


CASES = [((8, 4, 4, 3), -1, None, None), ((6, 5), -1, 0.9, 1e-4), ((4, 3, 5, 6), 1, 0.5, 0.1)]


@pytest.mark.parametrize("shape,axis,momentum,eps", CASES)
def test_keras(shape, axis, momentum, eps, rng):
    keras = pytest.importorskip("keras", reason="Keras is not installed "
                                "(pip install -e '.[compare]')")
    if keras.backend.backend() != "torch":  # conftest asks for it unless KERAS_BACKEND is set
        pytest.skip(f"Keras runs on {keras.backend.backend()}, not its PyTorch backend")
    import torch

    kw = {k: v for k, v in (("momentum", momentum), ("epsilon", eps)) if v is not None}
    layer = keras.layers.BatchNormalization(axis=axis, dtype="float32", **kw)
    layer.build(shape)
    gamma, beta, xs, dys = _inputs(rng, shape, axis)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    theirs = []
    for k, (x, dy) in enumerate(zip(xs, dys)):
        xt = torch.tensor(x, requires_grad=True)
        for v in (layer.gamma, layer.beta):
            v.value.grad = None
        y = layer(xt, training=k < STEPS - 1)
        (y * torch.tensor(dy)).sum().backward()
        theirs.append([y.detach().numpy(), xt.grad.numpy(), layer.gamma.value.grad.numpy(),
                       layer.beta.value.grad.numpy(),
                       layer.moving_mean.value.detach().numpy().copy(),
                       layer.moving_variance.value.detach().numpy().copy()])
    ours = _numbn_steps("keras", shape, axis, momentum if momentum is not None else 0.99,
                        eps if eps is not None else 1e-3, gamma, beta, xs, dys)
    _compare(ours, theirs, f"keras {keras.__version__}")


@pytest.mark.parametrize("shape,axis,momentum,eps", CASES)
def test_flax(shape, axis, momentum, eps, rng):
    pytest.importorskip("flax", reason="Flax is not installed (pip install flax)")
    import flax
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    kw = {k: v for k, v in (("momentum", momentum), ("epsilon", eps)) if v is not None}
    module = nn.BatchNorm(axis=axis, **kw)
    gamma, beta, xs, dys = _inputs(rng, shape, axis)
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros(shape, jnp.float32),
                            use_running_average=False)
    params = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
    stats = variables["batch_stats"]
    theirs = []
    for k, (x, dy) in enumerate(zip(xs, dys)):
        training = k < STEPS - 1

        def loss(x, params, stats=stats, dy=dy, training=training):
            y, updates = module.apply({"params": params, "batch_stats": stats}, x,
                                      use_running_average=not training,
                                      mutable=["batch_stats"])
            return jnp.sum(y * dy), (y, updates["batch_stats"])

        (_, (y, new)), (dx, dp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            jnp.asarray(x), params)
        if training:
            stats = new
        theirs.append([np.asarray(v) for v in (y, dx, dp["scale"], dp["bias"], stats["mean"],
                                               stats["var"])])
    ours = _numbn_steps("flax", shape, axis, momentum if momentum is not None else 0.99,
                        eps if eps is not None else 1e-5, gamma, beta, xs, dys)
    _compare(ours, theirs, f"flax {flax.__version__}")


@pytest.mark.parametrize("shape,axis,momentum,eps", CASES)
def test_paddle(shape, axis, momentum, eps, rng):
    paddle = pytest.importorskip("paddle", reason="PaddlePaddle is not installed "
                                 "(pip install paddlepaddle)")
    paddle.set_device("cpu")
    layer_type = {2: paddle.nn.BatchNorm1D, 3: paddle.nn.BatchNorm1D,
                  4: paddle.nn.BatchNorm2D, 5: paddle.nn.BatchNorm3D}[len(shape)]
    kw = {k: v for k, v in (("momentum", momentum), ("epsilon", eps)) if v is not None}
    if axis % len(shape) != 1:
        kw["data_format"] = {2: "NC", 3: "NLC", 4: "NHWC", 5: "NDHWC"}[len(shape)]
    layer = layer_type(shape[axis], **kw)
    gamma, beta, xs, dys = _inputs(rng, shape, axis)
    layer.weight.set_value(gamma)
    layer.bias.set_value(beta)
    theirs = []
    for k, (x, dy) in enumerate(zip(xs, dys)):
        if k < STEPS - 1:
            layer.train()
        else:
            layer.eval()
        layer.weight.clear_gradient()
        layer.bias.clear_gradient()
        xt = paddle.to_tensor(x, stop_gradient=False)
        with warnings.catch_warnings():  # Paddle says how it tracks statistics, each call
            warnings.filterwarnings("ignore", "When training, we now always track")
            y = layer(xt)
        (y * paddle.to_tensor(dy)).sum().backward()
        theirs.append([np.array(v.numpy()) for v in (y, xt.grad, layer.weight.grad,
                                                     layer.bias.grad, layer._mean,
                                                     layer._variance)])
    ours = _numbn_steps("paddle", shape, axis, momentum if momentum is not None else 0.9,
                        eps if eps is not None else 1e-5, gamma, beta, xs, dys)
    _compare(ours, theirs, f"paddle {paddle.__version__}")
