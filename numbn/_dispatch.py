"""Backend choice and array-kind handling.

Nothing here touches a GPU driver at import time: whether CUDA works is asked
only when a caller needs to know (``available_backends()``, ``backend="cuda"``
or a device array under ``"auto"``).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

import numpy as np

BACKENDS = ("cpu", "cuda", "numpy")
_CHOICES = ("auto",) + BACKENDS
_KDL_CUDA = 2  # DLPack device type of CUDA memory


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run on this machine; the message says why."""


def _check_name(name: str, where: str = "") -> str:
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}{where}; choose one of {', '.join(_CHOICES)}")
    return name


#: The default backend: ``NUMBN_BACKEND``'s, else "auto". Not checked here
#: but where it is used (:func:`_checked_default`): a typo in the variable
#: makes every call that takes the default raise, while ``import numbn``
#: and ``numbn info`` (which says what is wrong) still work.
_default = os.environ.get("NUMBN_BACKEND", "auto").strip().lower() or "auto"


def _checked_default() -> str:
    """The default backend; a ValueError that names ``NUMBN_BACKEND`` when
    the variable set it to no backend (:func:`set_backend` checks its own)."""
    return _check_name(_default, " in the environment variable NUMBN_BACKEND")


class _BackendSetting(AbstractContextManager):
    """Returned by :func:`set_backend`: restores the previous default on exit."""

    def __init__(self, previous: str):
        self._previous = previous

    def __exit__(self, *exc):
        global _default
        _default = self._previous
        return False


def set_backend(name: str) -> _BackendSetting:
    """Set the default backend; also a context manager that restores the old one.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda", "numpy"}

    Returns
    -------
    A context manager: ``with numbn.set_backend("numpy"): ...`` sets the
    default for the block only.

    Raises
    ------
    ValueError
        For an unknown name.

    Examples
    --------
    >>> import numbn
    >>> with numbn.set_backend("numpy"):
    ...     numbn.get_backend()
    'numpy'
    """
    global _default
    previous = _default
    _default = _check_name(name)
    return _BackendSetting(previous)


def get_backend() -> str:
    """The default backend now in force (``"auto"`` unless set).

    Raises
    ------
    ValueError
        ``NUMBN_BACKEND`` names no backend (and :func:`set_backend` has not
        set one since).
    """
    return _checked_default()


def cuda_unavailable_reason() -> str | None:
    """Why ``"cuda"`` cannot run here, or None when it can."""
    try:
        from . import _cuda
    except ImportError as exc:  # numba-cuda missing or the module absent
        return f"the CUDA backend cannot be imported ({exc}); install numbn[cuda]"
    return _cuda.unavailable_reason()


def available_backends() -> list[str]:
    """The backends that work on this machine, e.g. ``['cpu', 'numpy']``.

    Examples
    --------
    >>> import numbn
    >>> "numpy" in numbn.available_backends()
    True
    """
    names = ["cpu"]
    if cuda_unavailable_reason() is None:
        names.append("cuda")
    names.append("numpy")
    return names


def is_device_array(a) -> bool:
    """True for arrays in CUDA memory (``__cuda_array_interface__`` or DLPack)."""
    if isinstance(a, np.ndarray):
        return False
    if getattr(type(a), "__cuda_ndarray__", False):
        # numba device arrays, and the CUDA simulator's, which have neither
        # __cuda_array_interface__ nor a CUDA DLPack device (checked first).
        return True
    if type(a).__module__.split(".", 1)[0] == "torch":
        # Asked, its array interface raises for a tensor that requires grad
        # (an nn.Parameter), which numbn reads detached as any other tensor.
        return bool(getattr(a, "is_cuda", False))
    if hasattr(a, "__cuda_array_interface__"):
        return True
    dev = getattr(a, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        return int(dev()[0]) == _KDL_CUDA
    except Exception:  # noqa: BLE001 - a broken protocol means "not a device array"
        return False


def resolve(backend: str, x) -> str:
    """The backend that runs for input ``x`` when ``backend`` was asked for."""
    if isinstance(x, np.ndarray) and (backend == "cpu" or (
            backend == "auto" and _default in ("auto", "cpu"))):
        return "cpu"  # the common case, without the general checks below
    name = _check_name(backend)
    if name == "auto":
        name = _checked_default()
    device = is_device_array(x)
    if name == "auto":
        if device:
            name = "cuda"
        elif isinstance(x, np.ndarray):
            name = "cpu"
        else:
            raise TypeError(f"unsupported array type {type(x).__name__}: "
                            "numbn takes NumPy arrays or CUDA device arrays")
    if name == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend 'cuda' is unavailable: {reason}")
    elif device:
        if backend == "auto":  # the default chose it
            raise TypeError(f"x is a CUDA device array ({type(x).__name__}); the default "
                            f"backend {name!r} (set_backend or NUMBN_BACKEND) takes NumPy "
                            "arrays: pass backend='cuda', or set the default to 'auto'")
        raise TypeError(f"x is a CUDA device array ({type(x).__name__}); backend {name!r} "
                        "takes NumPy arrays: use backend='cuda' or 'auto'")
    return name
