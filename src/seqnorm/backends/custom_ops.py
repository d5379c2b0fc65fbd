"""The glue between a backend's kernels and torch: custom ops with autograd.

A kernel family is a forward and a backward implementation (plain functions of
tensors, with type annotations). :class:`ForwardOp` makes the forward a
``torch.library`` custom op with a fake (meta) implementation and an autograd
formula, so modules, autograd and ``torch.compile(fullgraph=True)`` see an
ordinary op; in eager mode the same implementation runs through an
``autograd.Function`` with the same ``setup_context`` and backward (the custom
op's dispatch costs ~20 µs a call), or bare when no gradient is needed.
:class:`BackwardOp` does the same for a backward implementation.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from ..running import move_nu_from_sums

__all__ = ["ForwardOp", "BackwardOp", "needs_grad", "power_autograd"]


def needs_grad(args) -> bool:
    """Whether autograd records a call on ``args``: grad mode on and a tensor among them
    that requires grad (torch's own C test, as ``torch.library``'s autograd uses it: ~0.15 µs
    less than a Python loop)."""
    return _grad_enabled() and _any_requires_grad(*args)


_grad_enabled, _any_requires_grad = torch._C.is_grad_enabled, torch._C._any_requires_grad
_transforms_active = torch._C._are_functorch_transforms_active


class ForwardOp:
    """``seqnorm::name`` from ``impl`` (whose first ``n_diff`` outputs are
    differentiable), its ``fake`` implementation, and its autograd ``setup`` /
    ``backward`` (``torch.library.register_autograd``'s).

    ``n_out``: how many outputs the callers read (default: all). In eager mode the
    autograd.Function returns only those — the rest (what the backward needs) is
    saved by ``setup`` — since each output it returns costs host time (issue 27);
    ``impl`` may return None for an absent output there, which the custom op
    returns as an empty tensor. ``plain``: what runs instead of ``impl`` in eager mode
    when no gradient is recorded (its first ``n_out`` outputs: it may skip what only a
    backward reads). ``recorded``: what the autograd.Function runs instead of ``impl`` in
    eager mode (all outputs; None for one that neither the callers nor the backward read
    in that call, e.g. an eval step's zero batch statistics — the custom op, which must
    match its fake, keeps ``impl``)."""

    def __init__(self, name: str, impl: Callable, fake: Callable, setup: Callable, backward: Callable,
                 n_diff: int, n_out: Optional[int] = None, plain: Optional[Callable] = None,
                 recorded: Optional[Callable] = None):
        self.impl = impl
        self.n_out = n_out
        self.plain = plain or impl

        def op_impl(*args):
            return tuple(t if t is not None else args[0].new_empty(0) for t in impl(*args))

        op_impl.__name__, op_impl.__signature__ = impl.__name__, inspect.signature(impl, eval_str=True)

        self.op = torch.library.custom_op(f"seqnorm::{name}", mutates_args=())(op_impl)
        self.op.register_fake(fake)
        torch.library.register_autograd(f"seqnorm::{name}", backward, setup_context=setup)
        self.function = eager_function(name, recorded or impl, setup, backward, n_diff, n_out)
        self.function_y = eager_function(name, recorded or impl, setup, backward, n_diff, 1)

    def __call__(self, *args):
        """Trace the custom op under torch.compile; in eager mode run the
        autograd.Function when a gradient is needed and the bare kernel otherwise."""
        if torch.compiler.is_compiling():
            return self.op(*args)
        if _grad_enabled() and _any_requires_grad(*args):
            return _apply(self.function, args)
        return self.plain(*args)

    def y(self, *args):
        """The first output alone, for a caller that reads nothing else (a LayerNorm's
        ``y``): as :meth:`__call__`, but the eager autograd.Function returns ``y`` alone
        (each output it returns costs ~0.4 µs of host time, issue 27)."""
        if torch.compiler.is_compiling():
            return self.op(*args)[0]
        if _grad_enabled() and _any_requires_grad(*args):
            return _apply(self.function_y, args)
        return self.plain(*args)[0]


def _apply(function, args):
    """``function.apply(*args)`` by autograd's own (C++) apply, ~3 µs less a call than
    ``Function.apply``'s Python wrapper, which binds default arguments (none here: no
    ``setup_context``) and unwraps functorch wrappers left dead by a transform that has
    exited (a tensor that escaped ``vmap``/``grad``: none reaches a norm's forward). Under
    an active functorch transform the wrapper runs, as before."""
    if _transforms_active():
        return function.apply(*args)
    return function.c_apply(*args)


class BackwardOp:
    """``seqnorm::name`` from a backward ``impl`` and its ``fake``: the op while
    torch.compile traces, the plain implementation in eager mode."""

    def __init__(self, name: str, impl: Callable, fake: Callable):
        self.impl = impl
        self.op = torch.library.custom_op(f"seqnorm::{name}", mutates_args=())(impl)
        self.op.register_fake(fake)

    def __call__(self, *args):
        return (self.op if torch.compiler.is_compiling() else self.impl)(*args)


def eager_function(name: str, impl: Callable, setup: Callable, backward: Callable, n_diff: int,
                   n_out: Optional[int] = None):
    """An autograd.Function running ``impl`` with the custom op's own
    ``setup_context`` and backward, for eager mode; it returns the first ``n_out``
    outputs (all by default); ``n_out=1``: the first output itself, not a tuple (its
    backward gets None for the gradients of the outputs it does not return)."""

    if n_out == 1:
        class _Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                # (no set_materialize_grads(False): the one output is the one the backward is called for)
                out = impl(*inputs)
                setup(ctx, inputs, out)
                return out[0]

            @staticmethod
            def backward(ctx, dy):
                return backward(ctx, dy, None)

        _Fn.__name__ = f"{name}_y_function"
        _Fn.c_apply = super(torch.autograd.Function, _Fn).apply
        return _Fn

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.set_materialize_grads(False)  # an unused output (the sum s) gets None, not zeros
            out = impl(*inputs)
            setup(ctx, inputs, out)
            if n_out is not None:
                out = out[:n_out]
            if len(out) > n_diff:
                ctx.mark_non_differentiable(*(t for t in out[n_diff:] if t is not None))
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    _Fn.__name__ = f"{name}_function"
    _Fn.c_apply = super(torch.autograd.Function, _Fn).apply   # (see _apply)
    return _Fn


def power_autograd(power_bwd: Callable):
    """PowerNorm's ``(setup_context, backward)`` for a forward op returning
    ``(y, batch_phi, count, rstd, nu_before)`` from inputs ``(x, weight, bias,
    pad, running_phi, running_nu, eps, factor)``, and a backward op
    ``power_bwd(dy, x, weight, pad, rstd, nu) -> (dx, dγ, dβ)``: the backward
    moves ν (Algorithm 1) from ``nu_before`` — a saved output, so that
    torch.compile's backward reads ν as of the forward."""

    def setup(ctx, inputs, output):
        x, weight, bias, pad, running_phi, running_nu, eps, factor = inputs
        _, batch_phi, count, rstd, nu_before = output
        ctx.save_for_backward(x, weight, pad, rstd, batch_phi, count, nu_before)
        ctx.nu, ctx.factor, ctx.has_bias = running_nu, factor, bias is not None   # ν: the buffer it moves

    def backward(ctx, dy, *_):
        x, weight, pad, rstd, batch_phi, count, nu_before = ctx.saved_tensors
        if dy is None:
            return (None,) * 8
        nu = ctx.nu
        dx, dgamma, dbeta = power_bwd(dy, x, weight, pad, rstd, nu_before if nu is not None else None)
        if nu is not None:
            move_nu_from_sums(nu, nu_before, rstd, batch_phi, weight, dgamma, count, ctx.factor)
        return (dx, dgamma.to(weight.dtype) if weight is not None else None, dbeta if ctx.has_bias else None,
                None, None, None, None, None)

    return setup, backward
