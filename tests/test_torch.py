"""numbn against PyTorch itself: the functional form, nn.BatchNorm1d/2d/3d over
several steps, autograd gradients, and state_dict loading."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HOST_BACKENDS, close, make, requires_torch

import numbn

pytestmark = requires_torch


@pytest.fixture(scope="module")
def torch():
    import torch

    torch.manual_seed(0)
    return torch


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_functional(torch, rng, backend, dtype, training):
    x = make(rng, (6, 4, 5, 3), dtype)
    w, b = make(rng, 4, dtype, 1, 0.3), make(rng, 4, dtype, 0, 0.3)
    rm, rv = make(rng, 4, dtype, 0, 0.2), np.abs(make(rng, 4, dtype, 1, 0.2))
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    expected = torch.nn.functional.batch_norm(torch.tensor(x), trm, trv, torch.tensor(w),
                                              torch.tensor(b), training, 0.3, 1e-4)
    y = numbn.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-4, backend=backend)
    close(y, expected.numpy(), dtype)
    close(rm, trm.numpy(), dtype)
    close(rv, trv.numpy(), dtype)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dim,shape", [(1, (16, 6)), (1, (4, 6, 9)), (2, (3, 6, 5, 4)),
                                       (3, (2, 6, 3, 4, 2))])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_layer_matches_nn_batchnorm(torch, rng, backend, dim, shape, momentum, affine, track):
    cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dim]
    tbn = cls(6, momentum=momentum, affine=affine, track_running_stats=track).double()
    bn = numbn.BatchNorm(6, momentum=momentum, affine=affine, track_running_stats=track,
                         dtype=np.float64, backend=backend)
    for step in range(3):
        x = make(rng, shape, np.float64, step, 1 + step)
        dy = make(rng, shape, np.float64, 0, 1)
        tx = torch.tensor(x, requires_grad=True)
        ty = tbn(tx)
        ty.backward(torch.tensor(dy))
        y = bn(x)
        dx = bn.backward(dy)
        close(y, ty.detach().numpy(), np.float64)
        close(dx, tx.grad.numpy(), np.float64)
        if affine:
            close(bn.grad_weight, tbn.weight.grad.numpy(), np.float64)
            close(bn.grad_bias, tbn.bias.grad.numpy(), np.float64)
            tbn.weight.grad = tbn.bias.grad = None
        if track:
            close(bn.running_mean, tbn.running_mean.numpy(), np.float64)
            close(bn.running_var, tbn.running_var.numpy(), np.float64)
            assert bn.num_batches_tracked == int(tbn.num_batches_tracked)
    tbn.eval()
    bn.eval()
    x = make(rng, shape, np.float64, 1, 2)
    close(bn(x), tbn(torch.tensor(x)).detach().numpy(), np.float64)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_matches_native_batch_norm_backward(torch, rng, backend, dtype):
    x = make(rng, (8, 5, 6, 7), dtype)
    dy = make(rng, (8, 5, 6, 7), dtype, 0, 1)
    w = make(rng, 5, dtype, 1, 0.3)
    tx, tw = torch.tensor(x), torch.tensor(w)
    _, sm, si = torch.ops.aten.native_batch_norm(tx, tw, None, None, None, True, 0.1, 1e-5)
    tdx, tdw, tdb = torch.ops.aten.native_batch_norm_backward(
        torch.tensor(dy), tx, tw, None, None, sm, si, True, 1e-5, [True, True, True])
    _, mean, invstd = numbn.batch_norm_forward(x, w, axis=1, backend=backend)
    close(mean, sm.numpy(), dtype)
    close(invstd, si.numpy(), dtype)
    dx, dw, db = numbn.batch_norm_backward(dy, x, mean, invstd, w, backend=backend)
    close(dx, tdx.numpy(), dtype, scale=2)
    close(dw, tdw.numpy(), dtype, scale=20)
    close(db, tdb.numpy(), dtype, scale=20)


def test_eval_backward_matches_autograd_with_frozen_statistics(torch, rng):
    tbn = torch.nn.BatchNorm2d(3).double()
    tbn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.5]))
    tbn.running_var.copy_(torch.tensor([1.5, 0.7, 2.0]))
    tbn.eval()
    bn = numbn.BatchNorm(3, dtype=np.float64)
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    bn.eval()
    x = make(rng, (4, 3, 5, 5), np.float64)
    dy = make(rng, (4, 3, 5, 5), np.float64, 0, 1)
    tx = torch.tensor(x, requires_grad=True)
    tbn(tx).backward(torch.tensor(dy))
    bn(x)
    close(bn.backward(dy), tx.grad.numpy(), np.float64)
    close(bn.grad_weight, tbn.weight.grad.numpy(), np.float64)


def test_state_dict_from_torch_loads_as_it_is(torch, rng):
    tbn = torch.nn.BatchNorm2d(4)
    tbn.train()
    for _ in range(3):
        tbn(torch.randn(5, 4, 3, 3) * 2 + 1)
    with torch.no_grad():
        tbn.weight.mul_(1.5)
        tbn.bias.add_(0.25)
    bn = numbn.BatchNorm(4)
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    assert bn.num_batches_tracked == 3
    tbn.eval()
    bn.eval()
    x = make(rng, (2, 4, 3, 3), np.float32)
    close(bn(x), tbn(torch.tensor(x)).detach().numpy(), np.float32)
    ours = bn.state_dict()
    assert set(ours) == set(tbn.state_dict())
    for k, v in tbn.state_dict().items():
        assert ours[k].dtype == v.numpy().dtype and ours[k].shape == v.numpy().shape


def test_float16_forward_matches_torch_float32_compute(torch, rng):
    x = make(rng, (8, 3, 6, 6), np.float16)
    expected = torch.nn.functional.batch_norm(torch.tensor(x.astype(np.float32)), None, None,
                                              training=True).numpy()
    close(numbn.batch_norm(x, training=True), expected, np.float16)


@pytest.mark.parametrize("shape,axis", [((6, 3, 5, 7), 1), ((64, 3, 40), 1), ((6, 5, 7, 3), -1),
                                        ((300, 3), 1)])
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("values", [(np.inf,), (-np.inf, -np.inf), (np.inf, -np.inf)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_infinity_gives_the_statistics_torch_gives(torch, rng, shape, axis, where, values,
                                                   dtype, layout, cpu_path):
    """A channel holding +inf has mean +inf in PyTorch (its variance NaN);
    the shifted sums made it NaN (inf - inf). +inf and -inf together: NaN."""
    from conftest import LAYOUTS

    x = make(rng, shape, dtype)
    channel = np.moveaxis(x, axis, 0)[1]  # a view: writes land in x
    at = 0 if where == "first" else channel.size - len(values)
    for k, v in enumerate(values):
        channel[np.unravel_index(at + k, channel.shape)] = v
    x = LAYOUTS[layout](x)
    tx = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, axis, 1)))
    c = shape[axis]
    trm, trv = torch.zeros(c, dtype=tx.dtype), torch.ones(c, dtype=tx.dtype)
    _, tmean, _ = torch.ops.aten.native_batch_norm(tx, None, None, trm, trv, True, 0.1, 1e-5)
    _, mean, _ = numbn.batch_norm_forward(x, axis=axis, backend="cpu")
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    numbn.batch_norm(x, rm, rv, training=True, axis=axis, backend="cpu")
    for ours, theirs in ((mean, tmean), (rm, trm), (rv, trv)):
        theirs = theirs.numpy()
        np.testing.assert_array_equal(ours[1], theirs[1])  # inf as inf, NaN as NaN
        close(ours[[0, 2]], theirs[[0, 2]], dtype)
