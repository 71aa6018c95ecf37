"""numbn: exact, fast, portable Batch Normalization for NumPy code.

Numba kernels on the CPU and on NVIDIA GPUs behind one dispatch layer, with
PyTorch, Keras, Paddle and Flax conventions. Importing numbn compiles nothing
and never touches a GPU driver.
"""

from ._dispatch import BackendUnavailableError, available_backends, get_backend, set_backend
from .folding import fold_conv, fold_linear
from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from .layers import CONVENTIONS, BatchNorm, Convention
from .recalibrate import recalibrate
from .sync import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "BatchNorm", "CONVENTIONS", "Convention",
    "available_backends", "batch_norm", "batch_norm_backward", "batch_norm_forward",
    "get_backend", "set_backend", "__version__",
    "SyncBatchNorm",
    "fold_conv", "fold_linear", "recalibrate",
]
