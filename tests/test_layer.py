"""The BatchNorm layer: modes, flags, state dict, files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import close, make, requires_torch

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
    (lambda s: s.update(num_batches_tracked=np.zeros((1, 1), np.int64)), "shape"),
    (lambda s: s.update(num_batches_tracked=np.array(2**63 + 5, np.uint64)), "int64"),
    (lambda s: s.update(num_batches_tracked=np.array(-1)), "int64"),
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


def test_num_batches_tracked_of_shape_one_loads():
    """PyTorch loads ``num_batches_tracked`` of shape (1,) too (old checkpoints)."""
    bn = numbn.BatchNorm(3)
    state = bn.state_dict()
    state["num_batches_tracked"] = np.array([7], np.int64)
    bn.load_state_dict(state)
    assert bn.num_batches_tracked == 7 and bn.state_dict()["num_batches_tracked"].shape == ()


def test_state_changes_write_the_held_arrays(rng):
    """load_state_dict, reset_parameters and reset_running_stats write into the
    arrays the layer holds, as PyTorch's copy_/fill_/zero_ do: references taken
    before (an optimiser's, the README's fine-tuning loop) stay the layer's."""
    bn = numbn.BatchNorm(3)
    bn(make(rng, (6, 3), np.float32))
    keys = ("weight", "bias", "running_mean", "running_var")
    held = {k: getattr(bn, k) for k in keys}
    state = {k: v if k == "num_batches_tracked" else v + 2 for k, v in bn.state_dict().items()}
    bn.load_state_dict(state)
    for k in keys:
        assert getattr(bn, k) is held[k]
        np.testing.assert_array_equal(held[k], state[k])
    bn.reset_parameters()
    for k, value in zip(keys, (1, 0, 0, 1)):
        assert getattr(bn, k) is held[k]
        np.testing.assert_array_equal(held[k], value)


def test_state_load_replaces_a_read_only_array(rng):
    """An array the layer cannot write (read-only) is replaced, not written."""
    bn = numbn.BatchNorm(3)
    frozen = np.full(3, 5.0, np.float32)
    frozen.flags.writeable = False
    bn.weight = frozen
    state = bn.state_dict()
    state["weight"] = np.full(3, 2.0, np.float32)
    bn.load_state_dict(state)
    np.testing.assert_array_equal(frozen, 5.0)
    np.testing.assert_array_equal(bn.weight, 2.0)


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


def test_save_load_by_the_same_path_without_extension(tmp_path, rng):
    """save() appends .npz as np.savez does; load() finds the file by the same path."""
    bn = numbn.BatchNorm(3)
    bn(make(rng, (6, 3), np.float32))
    bn.save(tmp_path / "checkpoint")
    assert (tmp_path / "checkpoint.npz").is_file()
    other = numbn.BatchNorm(3)
    other.load(tmp_path / "checkpoint")
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k], v)
    with pytest.raises(FileNotFoundError):
        other.load(tmp_path / "elsewhere")


@pytest.mark.parametrize("shape", [(64, 4), (16, 4, 8, 8)])
def test_backward_keeps_the_forwards_float64_statistics(shape, rng):
    """The layer's backward takes the float64 mean and invstd its forward
    normalised with: a float32 input of mean 1e4 and spread 1e-2 still gets
    dx to float32 precision (rounding the mean to float32 first, as
    batch_norm_forward returns it, put dx off by 3e-3 relative)."""
    x = (rng.standard_normal(shape) * 1e-2 + 1e4 + 0.3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    bn = numbn.BatchNorm(shape[1])
    bn(x)
    dx = bn.backward(dy)
    _, mean, invstd, _, _ = ref.forward_train(x)
    dx_ref = ref.backward(dy, x, mean, invstd)[0]
    assert np.abs(dx - dx_ref).max() / np.abs(dx_ref).max() < 1e-6


def test_constructor_errors():
    with pytest.raises(ValueError, match="positive integer"):
        numbn.BatchNorm(0)
    with pytest.raises(TypeError, match="dtype"):
        numbn.BatchNorm(3, dtype=np.int32)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        numbn.BatchNorm(3, backend="gpu")  # when made, as the functions check it per call


@pytest.mark.parametrize("make_layer", [
    lambda: numbn.BatchNorm(3),
    lambda: numbn.BatchNorm(3).eval(),
    lambda: numbn.BatchNorm(3, affine=False),
    lambda: numbn.BatchNorm(3, convention="keras"),
    lambda: numbn.BatchNorm(3, affine=False, track_running_stats=False),
    lambda: numbn.BatchNorm(3, affine=False, track_running_stats=False).eval(),
])
@pytest.mark.parametrize("order", ["C", "F"])
def test_wrong_channel_count_is_named(make_layer, order):
    """Input with another number of channels: the layer says so (it said
    "weight must have shape (4,)", blaming its own weight), and nothing
    changes; in every memory order, also for a layer with no vector to
    check C by (C-ordered input was taken with 5 channels there)."""
    bn = make_layer()
    before = bn.state_dict()
    with pytest.raises(ValueError, match=r"expected 3 channels on axis -?1, got input of shape"):
        bn(np.ones((2, 5, 4), np.float32, order=order))
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_save_load_file_objects(rng):
    """save() takes a binary file object (np.savez does), and load() too."""
    import io

    bn = numbn.BatchNorm(3)
    bn(make(rng, (6, 3), np.float32))
    buf = io.BytesIO()
    bn.save(buf)
    buf.seek(0)
    other = numbn.BatchNorm(3)
    other.load(buf)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k], v)


@pytest.mark.parametrize("momentum", ["fast", "0.5", [0.1], object(), True])
def test_momentum_that_is_no_number(momentum, rng):
    """Refused when the layer is made and when set later, at the assignment,
    which leaves the momentum the layer had (set later, it used to be
    checked only at the next training forward)."""
    with pytest.raises(ValueError, match="momentum must be a number"):
        numbn.BatchNorm(3, momentum=momentum)
    bn = numbn.BatchNorm(3)
    with pytest.raises(ValueError, match="momentum must be a number"):
        bn.momentum = momentum
    assert bn.momentum == 0.1
    bn.momentum = np.float32(0.5)  # NumPy scalars and 0-d arrays are numbers
    bn(make(rng, (8, 3), np.float32))
    assert bn.num_batches_tracked == 1


@pytest.mark.parametrize("convention", ["keras", "paddle", "flax"])
def test_momentum_none_set_later_outside_torch(convention, rng):
    """momentum=None (the cumulative average) is torch's: refused for the
    other conventions when set later as when the layer is made (set later,
    it was taken, and the torch average ran under another convention)."""
    with pytest.raises(ValueError, match="is a torch convention"):
        numbn.BatchNorm(2, convention=convention, momentum=None)
    bn = numbn.BatchNorm(2, convention=convention)
    with pytest.raises(ValueError, match="is a torch convention"):
        bn.momentum = None
    assert bn.momentum == numbn.CONVENTIONS[convention].momentum
    torch_bn = numbn.BatchNorm(2)
    torch_bn.momentum = None
    torch_bn(make(rng, (6, 2), np.float32))
    assert torch_bn.momentum is None and torch_bn.num_batches_tracked == 1


@pytest.mark.parametrize("eps,error", [(-1.0, ValueError), (float("nan"), ValueError),
                                       ("1e-3", TypeError), (None, TypeError)])
def test_eps_set_later_is_checked(eps, error, rng):
    """An eps set after construction is checked as the constructor checks
    one (a negative eps set later gave NaN output and still updated the
    running statistics)."""
    with pytest.raises(error, match="eps"):
        numbn.BatchNorm(3, eps=eps)
    bn = numbn.BatchNorm(3)
    with pytest.raises(error, match="eps"):
        bn.eps = eps
    assert bn.eps == 1e-5
    bn.eps = np.float64(0.0)
    assert type(bn.eps) is float and bn.eps == 0.0


def test_dtype_none_is_float32():
    """dtype=None is the default dtype, float32, as in PyTorch (NumPy's
    np.dtype(None) is float64)."""
    bn = numbn.BatchNorm(3, dtype=None)
    assert bn.dtype == np.float32 and bn.weight.dtype == np.float32


def test_state_of_a_layer_without_running_statistics_loads_back(tmp_path, rng):
    """Running statistics set to None are left out of the state, as PyTorch
    leaves None buffers out of its state_dict; the state loads back into the
    layer and its file too (it held NaN scalars that the layer refused)."""
    bn = numbn.BatchNorm(3)
    bn(make(rng, (6, 3), np.float32))
    bn.running_mean = bn.running_var = None
    state = bn.state_dict()
    assert sorted(state) == ["bias", "num_batches_tracked", "weight"]
    other = numbn.BatchNorm(3)
    other.running_mean = other.running_var = None
    other.load_state_dict(state)
    assert other.num_batches_tracked == 1
    bn.save(tmp_path / "bn.npz")
    other.load(tmp_path / "bn.npz")
    with pytest.raises(ValueError, match=r"unexpected \['running_mean', 'running_var'\]"):
        other.load_state_dict(numbn.BatchNorm(3).state_dict())
    assert other.running_mean is None and other.running_var is None


def _npy(path):
    with open(path, "wb") as f:  # np.save would append .npy to the name
        np.save(f, np.zeros(3, np.float32))


def _text(path):
    path.write_text("weight 1 1 1\n")


def _truncated(path):
    numbn.BatchNorm(3).save(path)
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize("write,pattern", [
    (_npy, r"holds one array \(\.npy\)"),
    (_text, "is not an .npz file of a state"),
    (_truncated, "is not an .npz file of a state"),
])
def test_load_of_a_file_that_is_no_state(write, pattern, tmp_path, rng):
    """A file that is not an .npz archive: a ValueError that says so (a .npy
    file gave a TypeError about the context-manager protocol, a text file
    NumPy's words about pickled data), the layer untouched."""
    path = tmp_path / "state.npz"
    write(path)
    bn = numbn.BatchNorm(3)
    bn(make(rng, (6, 3), np.float32))
    before = bn.state_dict()
    with pytest.raises(ValueError, match=pattern):
        bn.load(path)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_eval_backward_keeps_the_forwards_running_statistics(rng):
    """The backward of an eval forward uses the running statistics as they
    were at that forward, also in a float64 layer, whose running mean the
    forward could have kept without a copy."""
    bn = numbn.BatchNorm(3, dtype=np.float64).eval()
    bn.running_mean[:] = [0.5, -1.0, 2.0]
    x = make(rng, (6, 3), np.float64)
    dy = make(rng, (6, 3), np.float64)
    bn(x)
    bn.backward(dy)
    want = bn.grad_weight.copy()
    bn.running_mean[:] = 100.0
    bn.backward(dy)
    np.testing.assert_array_equal(bn.grad_weight, want)


def test_repr():
    assert "convention='flax'" in repr(numbn.BatchNorm(3, convention="flax"))


def test_running_stats_set_to_none_mean_batch_statistics(rng):
    """Running statistics set to None after the layer was made: batch
    statistics in eval mode too, nothing updated, the batch still counted,
    as PyTorch does (it decides by the buffers). Before, eval gave NaN or
    values read past the arrays, and training failed after counting."""
    x = make(rng, (8, 3, 4), np.float32)
    want, _, _ = numbn.batch_norm_forward(x)
    for training in (True, False):
        bn = numbn.BatchNorm(3).train(training)
        bn.running_mean = bn.running_var = None
        close(bn(x), want, np.float32)
        assert bn.running_mean is None and bn.running_var is None
        assert bn.num_batches_tracked == int(training)
        dx = bn.backward(np.ones_like(x))
        close(dx, np.zeros_like(x), np.float32)  # batch statistics: sum(dx) over a channel is 0


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("change,error,pattern", [
    (lambda bn: setattr(bn, "running_var", None), ValueError, "must both be arrays or both None"),
    (lambda bn: setattr(bn, "running_mean", None), ValueError, "must both be arrays or both None"),
    (lambda bn: setattr(bn, "running_mean", np.zeros(2, np.float32)), ValueError,
     r"running_mean must have shape \(3,\)"),
    (lambda bn: setattr(bn, "running_var", np.ones(4, np.float32)), ValueError,
     r"running_var must have shape \(3,\)"),
    (lambda bn: setattr(bn, "running_mean", np.zeros(3, np.int64)), TypeError,
     "running_mean must be float16, float32 or float64, not int64"),
    (lambda bn: setattr(bn, "running_var", np.ones((3, 1), np.float32)), ValueError,
     "running_var must have shape"),
])
def test_running_stats_set_badly_are_refused(change, error, pattern, training, rng):
    """Running statistics the caller set since the layer was made are checked
    as the functions check theirs, before anything changes (a length-2
    running_mean was written past its end, an int64 one truncated)."""
    bn = numbn.BatchNorm(3).train(training)
    bn(make(rng, (8, 3), np.float32))
    change(bn)
    held = {k: (None if v is None else np.array(v)) for k, v in
            (("running_mean", bn.running_mean), ("running_var", bn.running_var))}
    tracked = bn.num_batches_tracked
    with pytest.raises(error, match=pattern):
        bn(make(rng, (8, 3), np.float32))
    assert bn.num_batches_tracked == tracked
    for k, v in held.items():
        now = getattr(bn, k)
        assert (now is None) == (v is None)
        if v is not None:
            np.testing.assert_array_equal(now, v)


def test_read_only_running_stats(rng):
    """Read-only running statistics (from np.load(mmap_mode="r"), say) serve
    eval mode; training, which updates them, is refused before it counts."""
    x = make(rng, (8, 3), np.float32)
    bn = numbn.BatchNorm(3)
    bn.running_mean = np.full(3, 0.5, np.float32)
    bn.running_mean.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean is read-only"):
        bn(x)
    assert bn.num_batches_tracked == 0
    bn.eval()
    close(bn(x), (x - 0.5) / np.sqrt(1 + bn.eps), np.float32)


def test_tracking_switched_off_after_training(rng):
    """track_running_stats set to False on a layer that has running
    statistics: eval mode still normalises with them, and training neither
    updates them nor counts the batch (PyTorch passes them only when it
    tracks, and decides by the buffers)."""
    x = make(rng, (8, 3), np.float32)
    bn = numbn.BatchNorm(3)
    bn(x)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    bn.track_running_stats = False
    bn(x)
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == 1
    bn.eval()
    close(bn(x), (x - rm) / np.sqrt(rv + bn.eps), np.float32)


def test_state_without_num_batches_tracked_loads(rng):
    """A state from before PyTorch 0.4.1 has no num_batches_tracked: PyTorch
    loads it and keeps the layer's count; so does numbn (it raised)."""
    bn = numbn.BatchNorm(3)
    bn(make(rng, (6, 3), np.float32))
    state = bn.state_dict()
    del state["num_batches_tracked"]
    state["running_mean"] = state["running_mean"] + 1
    assert bn.load_state_dict(state) == ([], [])
    np.testing.assert_array_equal(bn.running_mean, state["running_mean"])
    assert bn.num_batches_tracked == 1


@requires_torch
def test_strict_false_as_pytorch(rng):
    """load_state_dict(strict=False): the state's keys the layer has are
    loaded (checked as ever), the rest ignored, the layer's keys it lacks
    kept; the (missing_keys, unexpected_keys) result is PyTorch's."""
    import torch

    state = numbn.BatchNorm(3).state_dict()
    state["running_mean"] = np.arange(3, dtype=np.float32)
    del state["running_var"], state["bias"]
    state["extra"] = np.zeros(2, np.float32)
    bn = numbn.BatchNorm(3)
    tbn = torch.nn.BatchNorm1d(3)
    got = bn.load_state_dict(state, strict=False)
    want = tbn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                               strict=False)
    assert got.missing_keys == sorted(want.missing_keys) == ["bias", "running_var"]
    assert got.unexpected_keys == sorted(want.unexpected_keys) == ["extra"]
    for k, v in tbn.state_dict().items():
        np.testing.assert_array_equal(bn.state_dict()[k], v.numpy(), err_msg=k)
    with pytest.raises(ValueError, match="weight must have shape"):  # present keys are checked
        bn.load_state_dict({"weight": np.ones(4, np.float32)}, strict=False)
    np.testing.assert_array_equal(bn.weight, np.ones(3, np.float32))
