"""PyTorch beside numbn, same shapes, so a ratio is one `asv compare` away."""

from __future__ import annotations

import importlib.util

import numpy as np

from ._common import LAYOUTS, SIZES, make_input


class TorchBatchNorm:
    params = (["cpu", "cuda"], ["float32", "float64"], list(LAYOUTS), list(SIZES))
    param_names = ["device", "dtype", "layout", "size"]

    def setup(self, device, dtype, layout, size):
        if importlib.util.find_spec("torch") is None:
            raise NotImplementedError("PyTorch is not installed")
        import numba
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise NotImplementedError("no CUDA device for PyTorch")
        torch.set_num_threads(numba.get_num_threads())
        self.torch = torch
        self.device = device
        x, axis = make_input(size, layout, dtype)
        x = np.moveaxis(x, axis, 1)  # channels-last memory stays channels-last
        self.x = torch.from_numpy(x).to(device)
        self.dy = torch.ones_like(self.x)
        c = self.x.shape[1]
        kw = dict(dtype=self.x.dtype, device=device)
        self.w, self.b = torch.ones(c, **kw), torch.zeros(c, **kw)
        self.rm, self.rv = torch.zeros(c, **kw), torch.ones(c, **kw)
        _, self.sm, self.si = torch.ops.aten.native_batch_norm(
            self.x, self.w, self.b, self.rm.clone(), self.rv.clone(), True, 0.1, 1e-5)
        self.time_forward_train(device)
        self.time_backward(device)

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def time_forward_train(self, *params):
        self.torch.nn.functional.batch_norm(self.x, self.rm, self.rv, self.w, self.b, True)
        self._sync()

    def time_eval(self, *params):
        self.torch.nn.functional.batch_norm(self.x, self.rm, self.rv, self.w, self.b, False)
        self._sync()

    def time_backward(self, *params):
        self.torch.ops.aten.native_batch_norm_backward(
            self.dy, self.x, self.w, self.rm, self.rv, self.sm, self.si, True, 1e-5,
            [True, True, True])
        self._sync()
