"""Backends: the canonical, flattened operations every norm lowers to.

``seqnorm.functional`` validates arguments, resolves padding, flattens the
input to rows and casts low-precision inputs to float32; it then calls one of
four operations on the active backend, always with the same simple contract:

========================  ====================================================
``rowwise_norm``          ``x (R, D)`` → ``y (R, D)``; LayerNorm (``center``)
                          or RMSNorm of each row.
``add_rowwise_norm``      ``x, residual (R, D)`` → ``(y, s)`` with
                          ``s = x + residual`` and ``y = rowwise_norm(s)``.
``featurewise_norm``      ``x (N, D)`` → ``(y, mean, var, count)``: masked
                          BatchNorm; statistics over the real rows.
``power_norm``            ``x (N, D)`` → ``(y, phi, count)``: PowerNorm.
========================  ====================================================

``pad`` is ``None`` or a bool ``(R,)`` / ``(N,)`` tensor, True at padding.
Inputs are float32 or float64 here. Outputs are 0 at padded rows and no
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
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "TorchBackend",
    "register_backend",
    "available_backends",
    "set_backend",
    "get_backend",
    "use_backend",
    "current_backend",
]

Tensor = torch.Tensor


def _zero_padded_rows(t: Tensor, pad: Optional[Tensor]) -> Tensor:
    """0 at padded rows. ``masked_fill`` (not a multiply) so that NaN/Inf in a
    padded row cannot leak, and the gradient to a padded row is exactly 0."""
    return t if pad is None else t.masked_fill(pad.unsqueeze(-1), 0)


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
    def add_rowwise_norm(cls, x, residual, weight, bias, eps, pad, center):
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
        if pad is None:
            count = torch.tensor(x.shape[0], device=x.device)
        else:
            count = (~pad).sum()
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
            count = torch.tensor(x.shape[0], device=x.device) if pad is None else (~pad).sum()
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
            count = xhat.shape[0] if pad is None else int((~pad).sum())
            if count > 0:  # an all-padding batch carries no information about ν
                with torch.no_grad():
                    gamma = (xhat * xhat).sum(0) / count
                    lam = (xhat * g).sum(0) / count
                    nu.copy_(nu_prev * (1 - factor * gamma) + factor * lam)
        else:
            g_tilde = g
        dx = _zero_padded_rows(g_tilde * rstd, pad)
        return dx, dweight, dbias, None, None, None, None, None


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


register_backend("torch", lambda x: TorchBackend)
# "auto" picks the fastest correct backend for the input; until the fused CPU
# kernels land it is the torch backend everywhere.
register_backend("auto", lambda x: TorchBackend)
