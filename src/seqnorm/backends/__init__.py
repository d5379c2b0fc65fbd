"""Backends: the five flattened operations every norm lowers to, and who runs them.

:mod:`seqnorm.functional` validates arguments, resolves padding, flattens the
input to rows and casts low-precision inputs to float32 (unless the backend
lists the dtype in ``native_low_precision``: the fused kernels read bfloat16
themselves, and float16 where the CPU converts it in hardware); it then calls
one of five operations on the backend chosen for the input (:class:`Backend`):

========================  ====================================================
``rowwise_norm``          ``x (R, D)`` → ``y (R, D)``; LayerNorm (``center``)
                          or RMSNorm of each row.
``add_rowwise_norm``      ``x, residual (R, D)`` → ``(y, s)`` with
                          ``s = x + residual`` and ``y = rowwise_norm(s)``;
                          with ``need_sum=False`` (post-norm) a backend may
                          return ``s = None`` when no gradient is needed.
``featurewise_norm``      ``x (N, D)`` → ``(y, mean, var, count)``: masked
                          BatchNorm; statistics over the real rows.
``power_norm``            ``x (N, D)`` → ``(y, phi, count)``: PowerNorm.
``groupwise_norm``        ``x (B, C, T)`` → ``(y, mean, var, count)``: masked
                          GroupNorm (InstanceNorm: ``groups = C``); statistics
                          ``(B, G)`` over each sequence's real steps, ``count
                          (B,)`` its real steps. ``pad`` is ``(B, T)``.
========================  ====================================================

``pad`` is ``None`` or a bool ``(R,)`` / ``(N,)`` tensor, True at padding.
Inputs are float32 or float64 here (or a backend's native low-precision dtype,
with float32 parameters and statistics). Outputs are 0 at padded rows and no
gradient reaches a padded row. Running statistics are *not* updated by a
backend (:mod:`seqnorm.running` does that, called from ``functional``), except
PowerNorm's ν, which Algorithm 1 updates during the backward pass (through
:func:`seqnorm.running.update_running_nu`).
A backend with ``fuses_running_update = True`` (the triton kernels) takes
``running=`` in ``featurewise_norm`` / ``power_norm`` (and offers
``instance_running_update``): where the policy is the device-side select
(:func:`seqnorm.running.sync_free`, in eager mode), ``functional`` hands it
the running statistics and its finalize kernel moves them as
:mod:`seqnorm.running` specifies — so a training step launches no torch op.
A backend with ``takes_tokens = True`` (the triton kernels) takes the row-wise
operations' ``x`` (and ``residual``) as the input's ``(*, D)`` itself, with
parameters as they are and the padding mask in the input's token shape (its rows
in order), and returns ``y`` (and ``s``) in that shape: no view is left for
autograd to record around the op, no flat mask is made (host time per call).
A backend with ``optional_group_statistics = True`` takes ``statistics=False`` in
``groupwise_norm`` (the caller reads ``y`` alone) and may return None for the rest.
A backend with ``native_params = True`` gets parameters and running
statistics in their own dtype (no cast) and returns their gradients in it.

The feature-wise operations take ``reduce``: ``None`` (this process's batch) or
a :class:`~seqnorm.backends.torch.StatsReduce` hook that combines statistics
across processes (the Sync modules). Only backends with ``reduces = True``
take a hook; ``functional`` runs the others' hooked calls on the torch backend.

A backend is one module in this package that calls :func:`register_backend`
when imported; :data:`BUILTIN` names the modules, imported on first use (the
fused backend imports Numba, which the other backends do not need).
``"auto"`` picks the Triton kernels for CUDA inputs, the fused kernels for
large CPU inputs, and torch elsewhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from typing import Callable, Dict, Iterator, Optional, Protocol, Tuple

import torch
# (imported by name: in this package `torch` becomes the .torch backend module once that is imported)
from torch.compiler import is_compiling as _is_compiling

__all__ = [
    "Backend",
    "BUILTIN",
    "AUTO_MIN_NUMEL",
    "register_backend",
    "available_backends",
    "backend_named",
    "set_backend",
    "get_backend",
    "use_backend",
    "current_backend",
]

Tensor = torch.Tensor


class Backend(Protocol):
    """What a backend provides (see the table above for the contract)."""

    name: str
    #: dtypes read and written as they are (computed in float32)
    native_low_precision: Tuple[torch.dtype, ...]
    #: whether the feature-wise operations take a ``reduce`` hook
    reduces: bool

    def rowwise_norm(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     pad: Optional[Tensor], center: bool) -> Tensor: ...

    def add_rowwise_norm(self, x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float, pad: Optional[Tensor], center: bool, need_sum: bool = True
                         ) -> Tuple[Tensor, Optional[Tensor]]: ...

    def featurewise_norm(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                         pad: Optional[Tensor], mean: Optional[Tensor] = None, var: Optional[Tensor] = None,
                         reduce=None) -> Tuple[Tensor, Tensor, Tensor, Tensor]: ...

    def power_norm(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   pad: Optional[Tensor], running_phi: Tensor, running_nu: Optional[Tensor], factor: float,
                   reduce=None) -> Tuple[Tensor, Tensor, Tensor]: ...

    def groupwise_norm(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       pad: Optional[Tensor], groups: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]: ...


#: name → module of this package that registers it (imported on first use)
BUILTIN = {"torch": "torch", "reference": "reference", "fused": "fused", "triton": "triton"}

# Below about a million elements the fixed cost of a fused call (~40 µs forward,
# ~150 µs forward+backward: argument handling, the autograd.Function, Numba's
# thread launch) outweighs the kernels' gain over torch's own: the measured
# crossover (LayerNorm forward+backward) is between 0.5 M and 1 M elements; see
# benchmarks/RESULTS.md.
AUTO_MIN_NUMEL = 1 << 20

_choosers: Dict[str, Callable[[Tensor], Backend]] = {}
_unavailable: Dict[str, str] = {}     # name → why its module did not import
_active: contextvars.ContextVar[str] = contextvars.ContextVar("seqnorm_backend", default="auto")


def register_backend(name: str, chooser: Callable[[Tensor], Backend]) -> None:
    """Register ``chooser(x) -> backend`` under ``name``.

    The chooser sees the (flattened, float) input and returns the object whose
    methods run the op, so a backend can decline a device or dtype it does
    not support by returning another backend.
    """
    _choosers[name] = chooser


def _load(name: str) -> bool:
    """Import the built-in backend ``name`` once; whether it is registered."""
    if name not in _choosers and name in BUILTIN and name not in _unavailable:
        try:
            importlib.import_module(f"{__name__}.{BUILTIN[name]}")
        except ImportError as e:   # an optional dependency (Numba, Triton) is missing
            _unavailable[name] = str(e)
    return name in _choosers


@torch.compiler.assume_constant_result
def _loaded(name: str) -> bool:
    """:func:`_load` run as Python even while torch.compile traces (a constant of the trace):
    Dynamo would otherwise trace the backend's first import (Numba's) into the model's graph."""
    return _load(name)


def available_backends() -> Tuple[str, ...]:
    """Names accepted by :func:`set_backend`: ``"auto"`` and every backend that imports."""
    names = dict.fromkeys(list(BUILTIN) + list(_choosers))   # ordered, each once
    return ("auto",) + tuple(n for n in names if _load(n))


def backend_named(name: str, x: Tensor) -> Backend:
    """The object backend ``name`` runs ``x`` with (it may hand ``x`` to torch)."""
    if name == "auto":
        return _auto(x)
    if not _loaded(name):
        raise ValueError(f"backend {name!r} is not available: {_unavailable.get(name, 'not registered')}")
    return _choosers[name](x)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or (name != "auto" and name not in BUILTIN and name not in _choosers):
        raise ValueError(f"backend must be one of {sorted(set(BUILTIN) | set(_choosers) | {'auto'})}, "
                         f"got {name!r}")


def set_backend(name: str) -> None:
    """Select the backend for all later calls in this context: ``"auto"`` or a
    registered name (see :func:`available_backends`)."""
    _check_name(name)
    _active.set(name)


@torch.compiler.assume_constant_result
def get_backend() -> str:
    """The selected backend's name. torch.compile takes it as a constant of the
    trace (Dynamo cannot trace a ContextVar): a compiled function keeps the
    backend that was selected when it was compiled."""
    return _active.get()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ``with seqnorm.use_backend("torch"): ...``."""
    _check_name(name)
    token = _active.set(name)
    try:
        yield
    finally:
        _active.reset(token)


def current_backend(x: Tensor) -> Backend:
    """The backend object that runs an op on ``x`` now."""
    if _is_compiling():     # (the name a constant of the trace: see get_backend)
        return backend_named(get_backend(), x)
    # eager: the selected name's chooser read directly (issue 27: ~0.5 µs of host time a call less
    # than through backend_named and _loaded); a name not yet imported takes backend_named
    name = _active.get()
    if name == "auto":
        return _auto(x)
    chooser = _choosers.get(name)
    return chooser(x) if chooser is not None else backend_named(name, x)


def _auto(x: Tensor) -> Backend:
    """The Triton kernels for CUDA inputs (when Triton imports); the fused
    kernels for CPU inputs of at least :data:`AUTO_MIN_NUMEL` elements (when
    Numba imports); each hands what it does not take to torch, as does every
    other case."""
    # (is_cuda / is_cpu: ~1 µs less per call than building x.device and comparing its type)
    if x.is_cuda and _loaded("triton"):
        return _choosers["triton"](x)
    if x.is_cpu and x.numel() >= AUTO_MIN_NUMEL and _loaded("fused"):
        return _choosers["fused"](x)
    return backend_named("torch", x)
