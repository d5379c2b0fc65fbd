"""Backends: the canonical, flattened operations every norm lowers to.

``seqnorm.functional`` validates arguments, resolves padding, flattens the
input to rows and casts low-precision inputs to float32 (unless the backend
lists the dtype in ``native_low_precision``: the fused kernels read bfloat16
themselves, and float16 where the CPU converts it in hardware); it then calls
one of four operations on the active backend, always with the same simple
contract:

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
========================  ====================================================

``pad`` is ``None`` or a bool ``(R,)`` / ``(N,)`` tensor, True at padding.
Inputs are float32 or float64 here (or a backend's native low-precision dtype,
with float32 parameters and statistics). Outputs are 0 at padded rows and no
gradient reaches a padded row. Running statistics are *not* updated by a
backend (``functional`` does that, in one place), except PowerNorm's ν, which
Algorithm 1 updates during the backward pass.

A faster backend (fused CPU kernels) registers itself with
:func:`register_backend` and is picked with :func:`set_backend` or the
:func:`use_backend` context manager; the public signatures do not change.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import reference

__all__ = [
    "TorchBackend",
    "ReferenceBackend",
    "register_backend",
    "available_backends",
    "set_backend",
    "get_backend",
    "use_backend",
    "current_backend",
]

Tensor = torch.Tensor


class NonFiniteStatisticsWarning(RuntimeWarning):
    """A training batch had NaN/Inf statistics; the running statistics were kept."""


def update_running_nu(nu: Tensor, new: Tensor, has_tokens) -> None:
    """The one place PowerNorm's ν changes (every backend's backward).

    ``new`` is Algorithm 1's update, computed by the caller. ν keeps its value
    when the batch had no real token (``has_tokens``: a bool, or a 0-d bool
    tensor) and when ``new`` is not finite — NaN/Inf at a real token, or in the
    gradient (a loss-scaling overflow step): ν would stay poisoned for good, so
    the update is skipped with a :class:`NonFiniteStatisticsWarning`, as
    ``functional.update_running_stats`` does for the forward's statistics.
    """
    with torch.no_grad():
        if torch.compiler.is_compiling():  # traced: no data-dependent branch, no warning
            keep = torch.logical_not(torch.as_tensor(has_tokens) & torch.isfinite(new).all())
            nu.copy_(torch.where(keep, nu, new.to(nu.dtype)))
            return
        if not bool(has_tokens):
            return
        if not bool(torch.isfinite(new).all()):
            warnings.warn("seqnorm: a PowerNorm backward had NaN/Inf gradient statistics (NaN/Inf at real tokens "
                          "or in the gradient); running_nu was left unchanged", NonFiniteStatisticsWarning,
                          stacklevel=2)
            return
        nu.copy_(new.to(nu.dtype))


def _zero_padded_rows(t: Tensor, pad: Optional[Tensor]) -> Tensor:
    """0 at padded rows. ``masked_fill`` (not a multiply) so that NaN/Inf in a
    padded row cannot leak, and the gradient to a padded row is exactly 0."""
    return t if pad is None else t.masked_fill(pad.unsqueeze(-1), 0)


def _count_real(x: Tensor, pad: Optional[Tensor]) -> Tensor:
    """Number of real rows of ``x (N, D)``, as a 0-d tensor on x's device."""
    return torch.tensor(x.shape[0], device=x.device) if pad is None else (~pad).sum()


def _affine(xhat: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    y = xhat if weight is None else xhat * weight
    return y if bias is None else y + bias


class TorchBackend:
    """Composite torch ops: runs on every device and dtype torch supports.

    Row-wise norms call ``torch.nn.functional.layer_norm`` / ``rms_norm`` so
    that unpadded results are those of torch, bit for bit. Feature-wise norms
    are written out with reductions, since torch has no masked BatchNorm.
    """

    name = "torch"

    @staticmethod
    def rowwise_norm(x, weight, bias, eps, pad, center):
        x = _zero_padded_rows(x, pad)  # a zero row normalizes to 0: finite, no leak
        d = (x.shape[-1],)
        y = F.layer_norm(x, d, weight, bias, eps) if center else F.rms_norm(x, d, weight, eps)
        return _zero_padded_rows(y, pad)

    @classmethod
    def add_rowwise_norm(cls, x, residual, weight, bias, eps, pad, center, need_sum=True):
        s = x + residual
        return cls.rowwise_norm(s, weight, bias, eps, pad, center), s

    @staticmethod
    def masked_moments(x: Tensor, pad: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-feature mean and biased variance of the real rows of ``x (N, D)``.

        Corrected two-pass algorithm: ``m₁ = Σx/n``, ``δ = x − m₁``,
        ``mean = m₁ + Σδ/n``, ``var = Σδ²/n − (Σδ/n)²``. The second pass removes
        the rounding error of the first, so an offset of 1e4 costs no accuracy
        in float32 (no E[x²] − E[x]² cancellation). ``x`` must already be 0 at
        padded rows. Returns ``(mean (D,), var (D,), count ())``.
        """
        count = _count_real(x, pad)
        n = count.clamp_min(1).to(x.dtype)  # all padding: mean 0, var 0, not 0/0
        m1 = x.sum(0) / n
        delta = _zero_padded_rows(x - m1, pad)
        correction = delta.sum(0) / n
        var = (delta * delta).sum(0) / n - correction * correction
        return m1 + correction, var.clamp_min(0), count

    @classmethod
    def featurewise_norm(cls, x, weight, bias, eps, pad, mean=None, var=None):
        x = _zero_padded_rows(x, pad)
        batch_mean, batch_var, count = cls.masked_moments(x, pad)
        if mean is None:
            mean, var = batch_mean, batch_var
        y = _affine((x - mean) * torch.rsqrt(var + eps), weight, bias)
        return _zero_padded_rows(y, pad), batch_mean.detach(), batch_var.detach(), count

    @staticmethod
    def power_norm(x, weight, bias, eps, pad, running_phi, running_nu, factor):
        x = _zero_padded_rows(x, pad)
        with torch.no_grad():
            count = _count_real(x, pad)
            phi = (x * x).sum(0) / count.clamp_min(1).to(x.dtype)
        y = _PowerNormFunction.apply(x, weight, bias, pad, running_phi, running_nu, eps, factor)
        return y, phi, count


class _PowerNormFunction(torch.autograd.Function):
    """PowerNorm's forward with Algorithm 1's approximate backward.

    The forward divides by the running ψ² (a constant here); the backward
    subtracts ``ν ⊙ x̂`` from ``γ ⊙ ∂L/∂Y`` and updates ``ν`` in place (see
    :func:`seqnorm.reference.power_norm_backward` for the maths).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pad, running_phi, running_nu, eps, factor):
        rstd = torch.rsqrt(running_phi.to(x.dtype) + eps)                  # D
        xhat = _zero_padded_rows(x * rstd, pad)                             # N,D
        y = _zero_padded_rows(_affine(xhat, weight, bias), pad)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.pad, ctx.running_nu, ctx.factor = pad, running_nu, factor
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, rstd, weight = ctx.saved_tensors
        pad, nu, factor = ctx.pad, ctx.running_nu, ctx.factor
        dy = _zero_padded_rows(dy, pad)
        g = dy if weight is None else dy * weight                            # ∂L/∂x̂
        dweight = (dy * xhat).sum(0) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if nu is not None:
            nu_prev = nu.to(g.dtype)
            g_tilde = g - nu_prev * xhat
            count = int(_count_real(xhat, pad))
            if count > 0:  # an all-padding batch carries no information about ν
                with torch.no_grad():
                    gamma = (xhat * xhat).sum(0) / count
                    lam = (xhat * g).sum(0) / count
                    update_running_nu(nu, nu_prev * (1 - factor * gamma) + factor * lam, True)
        else:
            g_tilde = g
        dx = _zero_padded_rows(g_tilde * rstd, pad)
        return dx, dweight, dbias, None, None, None, None, None


# ---------------------------------------------------------------------------
# The reference backend: the float64 NumPy oracle behind autograd
# ---------------------------------------------------------------------------


def _np(t: Optional[Tensor]):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _back(a, like: Tensor) -> Optional[Tensor]:
    """A NumPy result as a tensor of ``like``'s dtype and device."""
    if a is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=like.device, dtype=like.dtype)


def _np_pad(pad: Optional[Tensor]):
    return None if pad is None else pad.detach().cpu().numpy()


class _ReferenceRowwise(torch.autograd.Function):
    """``(y, s)`` of :func:`seqnorm.reference.add_norm_forward`; ``s`` is unused
    (an empty tensor) when there is no residual."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, pad, center):
        if residual is None:
            fwd = reference.layer_norm_forward if center else reference.rms_norm_forward
            args = (_np(x), _np(weight), _np(bias)) if center else (_np(x), _np(weight))
            y, cache = fwd(*args, eps, _np_pad(pad))
            s = x.new_empty(0)
        else:
            y, s_np, cache = reference.add_norm_forward(_np(x), _np(residual), _np(weight), _np(bias),
                                                        eps, _np_pad(pad), center=center)
            s = _back(s_np, x)
        ctx.cache, ctx.has_residual = cache, residual is not None
        ctx.like = (x, weight, bias)
        return _back(y, x), s

    @staticmethod
    def backward(ctx, dy, ds):
        x, weight, bias = ctx.like
        if ctx.has_residual:
            dx, dr, dw, db = reference.add_norm_backward(_np(dy), ctx.cache, _np(ds))
        else:
            # one row-wise backward serves LN and RMS: the cache records `center`
            dx, dw, db = reference.layer_norm_backward(_np(dy), ctx.cache)
            dr = None
        return (_back(dx, x), _back(dr, x), _back(dw, weight) if weight is not None else None,
                _back(db, bias) if bias is not None else None, None, None, None)


class _ReferenceFeaturewise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, pad, mean, var):
        use_batch = mean is None
        y, cache = reference.seq_batch_norm_forward(_np(x), _np(weight), _np(bias), eps, _np_pad(pad),
                                                    _np(mean), _np(var), use_batch_stats=use_batch)
        ctx.cache, ctx.like = cache, (x, weight, bias)
        stats = (_back(cache["batch_mean"], x), _back(cache["batch_var"], x),
                 torch.tensor(int(cache["count"]), device=x.device))
        ctx.mark_non_differentiable(*stats)
        return (_back(y, x),) + stats

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, bias = ctx.like
        dx, dw, db = reference.seq_batch_norm_backward(_np(dy), ctx.cache)
        return (_back(dx, x), _back(dw, weight) if weight is not None else None,
                _back(db, bias) if bias is not None else None, None, None, None, None)


class _ReferencePower(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, pad, running_phi, running_nu, factor):
        y, cache = reference.power_norm_forward(_np(x), _np(running_phi), _np(weight), _np(bias), eps,
                                                _np_pad(pad))
        ctx.cache, ctx.like, ctx.nu, ctx.factor = cache, (x, weight, bias), running_nu, factor
        stats = (_back(cache["batch_phi"], x), torch.tensor(int(cache["count"]), device=x.device))
        ctx.mark_non_differentiable(*stats)
        return (_back(y, x),) + stats

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, bias = ctx.like
        dx, dw, db, new_nu = reference.power_norm_backward(_np(dy), ctx.cache, _np(ctx.nu), ctx.factor)
        if new_nu is not None:  # Algorithm 1 updates ν in the backward pass
            update_running_nu(ctx.nu, _back(new_nu, ctx.nu), True)
        return (_back(dx, x), _back(dw, weight) if weight is not None else None,
                _back(db, bias) if bias is not None else None, None, None, None, None, None)


class ReferenceBackend:
    """The float64 NumPy reference with its hand-written backward, behind
    autograd: slow, exact, for checking a model or another backend. Results are
    cast back to the input's dtype and device."""

    name = "reference"

    @staticmethod
    def rowwise_norm(x, weight, bias, eps, pad, center):
        return _ReferenceRowwise.apply(x, None, weight, bias, eps, pad, center)[0]

    @staticmethod
    def add_rowwise_norm(x, residual, weight, bias, eps, pad, center, need_sum=True):
        return _ReferenceRowwise.apply(x, residual, weight, bias, eps, pad, center)

    @staticmethod
    def featurewise_norm(x, weight, bias, eps, pad, mean=None, var=None):
        return _ReferenceFeaturewise.apply(x, weight, bias, eps, pad, mean, var)

    @staticmethod
    def power_norm(x, weight, bias, eps, pad, running_phi, running_nu, factor):
        return _ReferencePower.apply(x, weight, bias, eps, pad, running_phi, running_nu, factor)


# ---------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------

_BACKENDS: Dict[str, Callable[[Tensor], object]] = {}
_active: contextvars.ContextVar[str] = contextvars.ContextVar("seqnorm_backend", default="auto")


def register_backend(name: str, chooser: Callable[[Tensor], object]) -> None:
    """Register ``chooser(x) -> backend object`` under ``name``.

    The chooser sees the (flattened, float) input and returns the object whose
    four methods run the op, so a backend can decline a device or dtype it does
    not support by returning another backend.
    """
    _BACKENDS[name] = chooser


def available_backends() -> Tuple[str, ...]:
    return tuple(_BACKENDS)


def set_backend(name: str) -> None:
    """Select the backend for all later calls in this context: ``"auto"`` or a
    registered name (see :func:`available_backends`)."""
    _check_name(name)
    _active.set(name)


def get_backend() -> str:
    """The selected backend's name."""
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


def current_backend(x: Tensor):
    """The backend object that runs an op on ``x`` now."""
    return _BACKENDS[_active.get()](x)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {name!r}")


def _fused_or_torch(x: Tensor, min_numel: int = 0):
    """The fused backend where it supports ``x`` (CPU float32, float64,
    bfloat16, float16 with hardware conversions; Numba importable) and ``x``
    has at least ``min_numel`` elements; torch elsewhere."""
    if x.numel() < min_numel or x.device.type != "cpu":
        return TorchBackend
    fused = _fused_backend()
    return fused if fused is not None and x.dtype in fused.dtypes else TorchBackend


_fused_class = None  # the FusedBackend class once imported; False when Numba is missing


def _fused_backend():
    """The fused backend class, imported once; None when Numba is missing (the
    torch backend then computes the same thing)."""
    global _fused_class
    if _fused_class is None:
        try:
            from .fused import FusedBackend as _fused_class
        except ImportError:
            _fused_class = False
    return _fused_class or None


# Below about a million elements the fixed cost of a fused call (~40 µs forward,
# ~150 µs forward+backward: argument handling, the autograd.Function, Numba's
# thread launch) outweighs the kernels' gain over torch's own: the measured
# crossover (LayerNorm forward+backward) is between 0.5 M and 1 M elements; see
# benchmarks/RESULTS.md.
AUTO_MIN_NUMEL = 1 << 20

register_backend("torch", lambda x: TorchBackend)
register_backend("reference", lambda x: ReferenceBackend)
register_backend("fused", _fused_or_torch)
register_backend("auto", lambda x: _fused_or_torch(x, AUTO_MIN_NUMEL))
