"""The reference backend: the float64 NumPy oracle of :mod:`seqnorm.reference`
behind autograd, with its hand-written backward. Slow and exact, for checking
a model or another backend; results are cast back to the input's dtype and
device. See :mod:`seqnorm.backends` for the contract."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import reference
from ..running import update_running_nu
from . import register_backend

__all__ = ["ReferenceBackend"]

Tensor = torch.Tensor


def _np(t: Optional[Tensor]):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _back(a, like: Tensor) -> Optional[Tensor]:
    """A NumPy result as a tensor of ``like``'s dtype and device."""
    if a is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=like.device, dtype=like.dtype)


def _grads(ctx, dx, dw, db, others: int):
    """A backward's ``(dx, dweight, dbias)`` as tensors like the forward's
    ``ctx.like = (x, weight, bias)`` (the reference returns None for an absent
    parameter), then ``others`` Nones for the non-tensor inputs."""
    x, weight, bias = ctx.like
    return (_back(dx, x), _back(dw, weight), _back(db, bias)) + (None,) * others


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
        return _grads(ctx, *reference.seq_batch_norm_backward(_np(dy), ctx.cache), others=4)


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
        dx, dw, db, new_nu = reference.power_norm_backward(_np(dy), ctx.cache, _np(ctx.nu), ctx.factor)
        if new_nu is not None:  # Algorithm 1 updates ν in the backward pass
            update_running_nu(ctx.nu, _back(new_nu, ctx.nu), True)
        return _grads(ctx, dx, dw, db, others=5)


class _ReferenceGroupwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, pad, groups):
        y, cache = reference.group_norm_forward(_np(x), groups, _np(weight), _np(bias), eps, _np_pad(pad))
        ctx.cache, ctx.like = cache, (x, weight, bias)
        stats = (_back(cache["mean"], x), _back(cache["var"], x),
                 torch.from_numpy(cache["count"].astype(np.int64)).to(x.device))
        ctx.mark_non_differentiable(*stats)
        return (_back(y, x),) + stats

    @staticmethod
    def backward(ctx, dy, *_):
        return _grads(ctx, *reference.group_norm_backward(_np(dy), ctx.cache), others=3)


class ReferenceBackend:
    """The float64 NumPy reference with its hand-written backward, behind
    autograd: slow, exact, for checking a model or another backend. Results are
    cast back to the input's dtype and device."""

    name = "reference"
    native_low_precision = ()
    reduces = False

    @staticmethod
    def rowwise_norm(x, weight, bias, eps, pad, center):
        return _ReferenceRowwise.apply(x, None, weight, bias, eps, pad, center)[0]

    @staticmethod
    def add_rowwise_norm(x, residual, weight, bias, eps, pad, center, need_sum=True):
        return _ReferenceRowwise.apply(x, residual, weight, bias, eps, pad, center)

    @staticmethod
    def featurewise_norm(x, weight, bias, eps, pad, mean=None, var=None, reduce=None):
        return _ReferenceFeaturewise.apply(x, weight, bias, eps, pad, mean, var)

    @staticmethod
    def power_norm(x, weight, bias, eps, pad, running_phi, running_nu, factor, reduce=None):
        return _ReferencePower.apply(x, weight, bias, eps, pad, running_phi, running_nu, factor)

    @staticmethod
    def groupwise_norm(x, weight, bias, eps, pad, groups):
        return _ReferenceGroupwise.apply(x, weight, bias, eps, pad, groups)


register_backend("reference", lambda x: ReferenceBackend)
