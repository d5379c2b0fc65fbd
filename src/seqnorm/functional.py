r"""The public functional API: padding-aware norms on torch tensors.

Signatures mirror ``torch.nn.functional``: :func:`layer_norm` and
:func:`rms_norm` accept exactly what ``F.layer_norm`` / ``F.rms_norm`` accept
and return the same values and gradients; every function adds the keyword-only
``padding_mask`` (bool, True at padding) or ``lengths``.

What every function here guarantees:

* A padded token never enters a statistic; its output is exactly 0 and its
  gradient is exactly 0, whatever it contains (NaN and Inf included).
* float16 / bfloat16 inputs are computed in float32 (statistics, normalization
  and affine) and rounded once, at the output.
* A wrong shape, dtype or device raises ``ValueError`` / ``TypeError`` naming
  the argument and the expected shape; nothing is broadcast silently.

The work itself is done by the active backend (:mod:`seqnorm.backends`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from . import backends
from . import running as running_policy
from .checks import (LOW_PRECISION, cast, check_featurewise_input, check_input, check_param, compute_dtype,
                     split_rowwise)
from .backends.torch import StatsReduce, batch_norm_train_rows
from .masks import (current_padding, end_padded_lengths, flat_padding, host_context_mask, host_rows, lengths_mask,
                    padding_for_channels_first, padding_for_features, padding_for_rows, read_once, resolve_padding,
                    shape_str)
from .nested import is_jagged, pack, segment_ids, segment_sums, unpack
from .rms_variants import rms_affine
from .running import (NonFiniteStatisticsWarning, check_momentum, check_real_tokens, momentum_factor,
                      update_batch_norm_stats, update_running_stats)

__all__ = [
    "NonFiniteStatisticsWarning",
    "update_running_stats",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "seq_batch_norm",
    "power_norm",
    "group_norm",
    "instance_norm",
]

Tensor = torch.Tensor
_ShapeLike = Union[int, Sequence[int], torch.Size]


def _backend_for(t: Tensor, reduce=None, op: Optional[str] = None):
    """The backend that runs ``t``: the current one, or torch when a ``reduce``
    hook is given and the current one takes none, or when it lacks ``op`` (a
    third-party backend without the group-wise op)."""
    backend = backends.current_backend(t)
    if (reduce is not None and not backend.reduces) or (op is not None and not hasattr(backend, op)):
        backend = backends.backend_named("torch", t)
    return backend


def _as_is(t):
    return t


def _params_for(backend, cdt: torch.dtype):
    """How per-feature tensors (parameters, running statistics) reach ``backend``:
    as they are where it reads them in their own dtype (``native_params``: the
    triton kernels, no cast launched), else cast to the compute dtype ``cdt``."""
    return _as_is if getattr(backend, "native_params", False) else (lambda t: cast(t, cdt))


def _fuses_update(backend, x: Tensor, reduce, momentum, num_batches_tracked) -> bool:
    """Whether ``backend`` moves the running statistics inside its kernels (its
    finalize kernel applies :mod:`seqnorm.running`'s device-side select): where
    that is the policy (:func:`~seqnorm.running.sync_free`), in eager mode."""
    takes_reduce = reduce is None or getattr(backend, "fuses_reduced_update", lambda r, t: False)(reduce, x)
    return (takes_reduce and getattr(backend, "fuses_running_update", False)
            and (momentum is not None or num_batches_tracked is not None)
            and running_policy.sync_free(x) and not torch.compiler.is_compiling())


def _backend_and_rows(x: Tensor, rows: int, d: int, reduce=None):
    """The backend for ``x``, and ``x`` as ``(rows, d)``: in its own dtype when
    that backend reads it itself (the fused kernels take bfloat16 and float16
    and compute in float32 inside), else cast to the compute dtype here. A
    ``reduce`` hook goes to the torch backend unless the chosen one takes hooks.
    Returns ``(backend, rows_tensor, native)``."""
    backend = _backend_for(x, reduce)
    if x.dtype in backend.native_low_precision:
        return backend, x.reshape(rows, d), True
    x2 = x.reshape(rows, d)
    if x.dtype not in LOW_PRECISION:    # float32/float64 as they are: the chooser has seen this input
        return backend, x2, False
    x2 = x2.to(compute_dtype(x))
    return _backend_for(x2, reduce), x2, False


def _backend_and_tokens(x: Tensor, d: int, rows: Optional[int] = None):
    """``(backend, x for it, rows)``: ``x (*, D)`` as it is for a backend that takes tokens
    (``takes_tokens``: no reshape outside its op, so no view for autograd to record) when
    ``D`` is its last dimension, else as :func:`_backend_and_rows` gives it, ``(rows, d)``."""
    rows = math.prod(x.shape[:-1]) if rows is None else rows
    backend = backends.current_backend(x)
    if _takes_tokens(backend, x, d):
        return backend, x, rows
    return _backend_and_rows(x, rows, d)[:2] + (rows,)


def _takes_tokens(backend, x: Tensor, d: int) -> bool:
    """Whether ``backend`` takes ``x (*, d)`` as it is (see :func:`_backend_and_tokens`)."""
    return getattr(backend, "takes_tokens", False) and x.shape[-1] == d and (
        x.dtype in backend.native_low_precision or x.dtype not in LOW_PRECISION)


def _backend_mask(backend, x: Tensor, x2: Tensor, mask, rows: int) -> Optional[Tensor]:
    """A validated token mask (``False``: no padding) as ``backend`` takes it with ``x2``:
    as it is where the backend takes tokens and ``x2`` is ``x`` itself, else the flat
    ``(rows,)`` mask (:func:`~seqnorm.masks.flat_padding`)."""
    if mask is False or mask is None:
        return None
    if x2 is x and getattr(backend, "takes_tokens", False):
        return mask
    return flat_padding(mask, rows)


def _vector(t: Optional[Tensor], d: int, param) -> Optional[Tensor]:
    """A parameter as ``(d,)``, passed through ``param`` (:func:`_params_for`); no
    reshape when it already is (host time per call)."""
    if t is None:
        return t
    return param(t if t.dim() == 1 else t.reshape(d))


def _as_input(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in ``x``'s dtype and shape (``view_as``: reshape parses a torch.Size ~3 µs slower;
    none where it has them: with autograd recording a view is a node, ~3 µs)."""
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    if y.shape == x.shape:
        return y
    return y.view_as(x) if y.is_contiguous() else y.reshape(x.shape)


# ---------------------------------------------------------------------------
# The one lean call path (issues 16 and 27: host time per call, on every device)
# ---------------------------------------------------------------------------
#
# A call on a small input costs the Python around its few ops: on a (2, 8, 64) input the general
# path's checks, padding resolution and backend dispatch took longer than the ops, on the CPU and on
# a GPU alike. Every norm — module calls and functional calls, on every device and backend — first
# takes the lean path below: a few cheap checks (a plain tensor outside torch.compile, its feature
# width, per-feature tensors of the right shape on its device, a bool mask of the token grid on its
# device), the mask validated once per mask object and version (given, from cached lengths, or from
# the seqnorm.padding context), parameters passed as they are, then the backend's operation — the
# same tail as the general path's. Anything else returns None and the general path runs, which
# raises every error it raises (with the same message). Where the torch backend runs a plain
# float32/float64 CPU tensor and reading back is free (not seqnorm.running.sync_free), the tail is
# a few torch ops on the host's view of the mask (masks.host_rows: its padded/real rows read once).

_HOST_DTYPES = (torch.float32, torch.float64)
#: up to this many elements a padded row is filled through a (..., 1) view of the mask
#: (``masked_fill``: no reshape of the input and output); above, by index (``index_fill``
#: of the cached padded rows, 2–10× faster on large inputs; a non-contiguous input, which has no
#: (R, D) view, through the mask's view too)
_HOST_MASKED_FILL_MAX = 2048
_real_sync_free = running_policy.sync_free


def _lean_input(x) -> bool:
    """Whether ``x`` may take the lean path: a plain strided floating-point tensor outside
    torch.compile (which traces the general path)."""
    return type(x) is Tensor and not torch.compiler.is_compiling() and x.is_floating_point() and not x.is_nested


def _host_input(x) -> bool:
    """Whether ``x`` is run by the host ops: a plain float32/float64 CPU tensor, run by
    the torch backend (``auto`` below :data:`~seqnorm.backends.AUTO_MIN_NUMEL` elements,
    or ``torch``), where reading back is free (not :func:`~seqnorm.running.sync_free`:
    outside torch.compile; tests force that policy by replacing the function)."""
    if torch.compiler.is_compiling() or type(x) is not Tensor or not x.is_cpu:
        return False
    # the backend before the dtype: a CPU tensor sent to another backend (the CUDA path's host time measured
    # on the CPU, benchmarks/host_overhead.py --cuda-path) leaves here, as a CUDA tensor leaves at is_cpu
    name = backends.get_backend()      # (a ContextVar read: Dynamo cannot trace it, hence compiling first)
    if name != "torch" and (name != "auto" or x.numel() >= backends.AUTO_MIN_NUMEL):
        return False
    if x.dtype not in _HOST_DTYPES or x.is_nested:
        return False
    return running_policy.sync_free is _real_sync_free or not running_policy.sync_free(x)


def _lean_params(d: int, x: Tensor, *params) -> bool:
    """Each of ``params`` is None or a floating-point ``(d,)`` tensor on ``x``'s device."""
    shape, device = (d,), x.device
    for p in params:
        if p is not None and not (isinstance(p, Tensor) and p.shape == shape and p.is_floating_point()
                                  and p.device == device):
            return False
    return True


def _host_params(d: int, dtype, *params) -> bool:
    """Each of ``params`` is None or a ``(d,)`` CPU tensor of ``dtype`` (what the host ops take as it is)."""
    shape = (d,)
    for p in params:
        if p is not None and not (isinstance(p, Tensor) and p.shape == shape and p.dtype == dtype and p.is_cpu):
            return False
    return True


def _lean_mask(token_shape, padding_mask, lengths, x: Tensor, context: int):
    """The validated ``token_shape`` bool mask on ``x``'s device for the lean path,
    ``False`` for no padding, or None (the general path decides): ``padding_mask`` as
    given, the mask the general path last made of the same ``lengths`` tensor, or
    (``context``: 1 row-wise, 2 feature-wise, 3 channels first) the
    :func:`~seqnorm.padding` context's mask for ``token_shape``."""
    if padding_mask is None:
        if lengths is not None:
            mask = lengths_mask(lengths, token_shape[-1], x.device) if len(token_shape) == 2 else None
        elif not context or current_padding() is None:
            return False
        elif x.is_cpu and context < 3:
            mask = host_context_mask(token_shape, context == 1)
            if mask is None:
                return None
        else:
            mask = _context_mask(x, context)
        if mask is None:
            return None
    elif lengths is None:
        mask = padding_mask
    else:
        return None
    if type(mask) is not Tensor or mask.dtype != torch.bool or mask.shape != token_shape or mask.device != x.device:
        return None
    return mask


def _context_mask(x: Tensor, context: int):
    """The :func:`~seqnorm.padding` context's mask for ``x`` as the modules lay it out."""
    try:
        if context == 1:
            return padding_for_rows(x, 1, None, None)[0]
        if context == 2:
            return padding_for_features(x, None, None)[0] if x.dim() == 3 else None
        return padding_for_channels_first(x, None, None)[0]
    except ValueError:     # the general path raises it again, with its message
        return None


def lean_rowwise(x, normalized_shape, weight, bias, eps, padding_mask, lengths, center: bool,
                 residual=None, need_sum: bool = False, context: bool = False):
    """LayerNorm (``center``) or RMSNorm of ``x (*, D)`` (of ``x + residual`` when given:
    ``(y, s)``) on the lean path, or None (the general path). ``eps=None``: RMSNorm's
    default; ``context``: a module call, which takes the :func:`~seqnorm.padding` context.

    On the host ops (:func:`_host_rowwise`): without padding, ``torch.layer_norm`` /
    ``rms_norm``. With padding, the norm between two fills of the padded rows with 0 (through
    a ``(..., 1)`` view of the mask on small or non-contiguous inputs, by index on large ones): of the input
    only when autograd records — a zero row normalizes to a finite 0, so 0·NaN never reaches
    dx or dγ — and of the output, in place, only when a bias would put β there (a zero row's
    ``x̂·γ`` is 0). In inference rows are independent: the output fill alone makes padded
    rows 0, whatever the input held there. Elsewhere: the backend's ``rowwise_norm`` /
    ``add_rowwise_norm``, as the general path calls it."""
    if residual is None:      # the host ops, checked first (the common CPU call)
        y = _host_rowwise(x, normalized_shape, weight, bias, eps, padding_mask, lengths, center, context)
        if y is not None:
            return y
    if not _lean_input(x) or (residual is not None and (
            type(residual) is not Tensor or residual.shape != x.shape or residual.dtype != x.dtype
            or residual.is_nested)):
        return None
    checked = _rowwise_checks(x, normalized_shape, weight, bias, eps, padding_mask, lengths, context, False)
    if checked is None:
        return None
    d, eps, mask = checked
    rows = x.numel() // d if d else math.prod(x.shape[:-1])
    return _run_rowwise(x, rows, d, weight, bias, eps, None if mask is False else mask, center, residual, need_sum)


def _rowwise_checks(x, normalized_shape, weight, bias, eps, padding_mask, lengths, context, host: bool):
    """The lean checks of a row-wise call: ``(D, eps, mask)`` (RMSNorm's default ``eps``
    filled in; the mask as :func:`_lean_mask`'s), or None. ``host``: the parameters as
    the host ops take them (:func:`_host_params`), else as any backend (:func:`_lean_params`)."""
    if len(normalized_shape) != 1:
        return None
    d = normalized_shape[0]
    shape = x.shape
    if len(shape) < 2 or shape[-1] != d or not (_host_params(d, x.dtype, weight, bias) if host
                                                 else _lean_params(d, x, weight, bias)):
        return None
    if eps is None:   # RMSNorm's default: the input dtype's machine epsilon
        eps = torch.finfo(x.dtype).eps
    # (the token shape as a tuple's slice: slicing a torch.Size costs ~0.25 µs, a tuple's ~0.05)
    mask = _lean_mask(tuple(shape)[:-1], padding_mask, lengths, x, 1 if context else 0)
    return None if mask is None else (d, eps, mask)


def _host_rowwise(x, normalized_shape, weight, bias, eps, padding_mask, lengths, center: bool,
                  context: bool = False):
    """:func:`lean_rowwise` on the host ops, or None: a host input (:func:`_host_input`),
    ``(D,)`` parameters of its dtype on the CPU, a valid CPU mask (see there)."""
    checked = _host_input(x) and _rowwise_checks(x, normalized_shape, weight, bias, eps, padding_mask, lengths,
                                                 context, True)
    if not checked:
        return None
    d, eps, mask = checked
    nshape = (d,)
    if mask is not False:
        rows = host_rows(mask)
        if rows.n_pad:
            record = torch.is_grad_enabled()
            # (a non-contiguous input, e.g. a transposed (B, C, T) → (B, T, C) view as wav2vec2's feature
            # projection gets, has no (R, D) view to fill by index: the mask's (..., 1) view fills any layout)
            if x.numel() <= _HOST_MASKED_FILL_MAX or not x.is_contiguous():
                col = rows.col
                x1 = x.masked_fill(col, 0) if record else x
                y = (torch.layer_norm(x1, nshape, weight, bias, eps) if center
                     else torch.rms_norm(x1, nshape, weight, eps))
                return y.masked_fill_(col, 0) if bias is not None or not record else y
            x2 = x.view(-1, d)
            if record:
                x2 = x2.index_fill(0, rows.padded, 0)
            y = torch.layer_norm(x2, nshape, weight, bias, eps) if center else torch.rms_norm(x2, nshape, weight, eps)
            if bias is not None or not record:
                y = y.index_fill_(0, rows.padded, 0)
            return y.view_as(x)
    return torch.layer_norm(x, nshape, weight, bias, eps) if center else torch.rms_norm(x, nshape, weight, eps)


def _featurewise_lean(x, d_params, padding_mask, lengths, context):
    """The lean path's checks of a feature-wise ``x (B, T, D)`` / ``(N, D)`` and its
    per-feature tensors: its mask (as :func:`_lean_mask`), or None."""
    if not _lean_input(x):
        return None
    shape = x.shape
    if not 1 < len(shape) < 4 or not _lean_params(shape[-1], x, *d_params):
        return None
    return _lean_mask(tuple(shape)[:-1], padding_mask, lengths, x, 2 if context and len(shape) == 3 else 0)


def lean_seq_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, padding_mask,
                        lengths, num_batches_tracked, context: bool = False):
    """:func:`seq_batch_norm` (no ``reduce`` hook) on the lean path, or None (the general
    path). A CPU training step the host can read runs
    :func:`~seqnorm.backends.torch.batch_norm_train_rows` on the cached real rows."""
    if (running_mean is None) != (running_var is None) or not (
            momentum is None and isinstance(num_batches_tracked, Tensor)
            or type(momentum) is float and 0.0 <= momentum <= 1.0) \
            or not (num_batches_tracked is None or type(num_batches_tracked) is Tensor):
        return None
    if training and running_mean is not None:   # the host step, checked first
        y = _host_batch_norm_train(x, running_mean, running_var, num_batches_tracked, weight, bias, momentum, eps,
                                   padding_mask, lengths, context)
        if y is not None:
            return y
    mask = _featurewise_lean(x, (running_mean, running_var, weight, bias), padding_mask, lengths, context)
    if mask is None:
        return None
    shape = x.shape
    d = shape[-1]
    backend, x2, rows = _backend_and_tokens(x, d)
    pad = _backend_mask(backend, x, x2, mask, rows)
    return _run_seq_batch_norm(x, backend, x2, pad, compute_dtype(x), running_mean, running_var, weight, bias,
                               training, momentum, eps, num_batches_tracked, None)


def _host_batch_norm_train(x, running_mean, running_var, num_batches_tracked, weight, bias, momentum, eps,
                           padding_mask, lengths, context: bool = False):
    """:func:`lean_seq_batch_norm`'s training step on the host
    (:func:`~seqnorm.backends.torch.batch_norm_train_rows` on the cached real rows), or None:
    fewer than 2 real rows, a momentum to check, or anything :func:`_host_input` declines."""
    if not _host_input(x):
        return None
    shape = x.shape
    d = shape[-1] if shape else 0
    if not (1 < len(shape) < 4 and running_mean is not None and running_var is not None
            and _host_params(d, x.dtype, running_mean, running_var, weight, bias) and x.is_contiguous()
            and (num_batches_tracked is None or type(num_batches_tracked) is Tensor)
            and (type(momentum) is float and 0.0 <= momentum <= 1.0
                 or momentum is None and isinstance(num_batches_tracked, Tensor))):
        return None
    mask = _lean_mask(tuple(shape)[:-1], padding_mask, lengths, x, 2 if context and len(shape) == 3 else 0)
    if mask is None:
        return None
    if mask is False:
        rows, n = None, shape[0] if len(shape) == 2 else shape[0] * shape[1]
    else:
        info = host_rows(mask)
        rows, n = (info.real if info.n_pad else None), info.n_real
    if n < 2 or d == 0:
        return None
    y = batch_norm_train_rows(x.view(-1, d), weight, bias, eps, rows, running_mean, running_var,
                              num_batches_tracked, momentum)
    return y.view_as(x)


def lean_power_norm(x, running_phi, running_nu, weight, bias, training, momentum, eps, padding_mask, lengths,
                    num_batches_tracked, context: bool = False):
    """:func:`power_norm` (no ``reduce`` hook) on the lean path, or None (the general path)."""
    if not isinstance(running_phi, Tensor) or not (
            momentum is None and isinstance(num_batches_tracked, Tensor)
            or type(momentum) is float and 0.0 <= momentum <= 1.0) \
            or not (num_batches_tracked is None or type(num_batches_tracked) is Tensor):
        return None
    mask = _featurewise_lean(x, (running_phi, running_nu, weight, bias), padding_mask, lengths, context)
    if mask is None:
        return None
    backend, x2, rows = _backend_and_tokens(x, x.shape[-1])
    pad = _backend_mask(backend, x, x2, mask, rows)
    return _run_power_norm(x, backend, x2, pad, compute_dtype(x), running_phi, running_nu, weight, bias, training, momentum, eps,
               num_batches_tracked, None)


def lean_groupwise(x, groups, weight, bias, eps, padding_mask, lengths, context: bool = False,
                   channels: Optional[int] = None):
    """:func:`group_norm` (``instance_norm`` with ``groups = C`` and no running statistics)
    of a channels-first ``x (N, C, L)`` on the lean path, or None (the general path);
    ``channels``: the module's number of channels, which ``C`` must be. A host input
    (:func:`_host_input`) with parameters of its dtype takes the host ops first
    (:func:`_host_groupwise`: torch's ``group_norm`` of each run of sequences' real steps)."""
    if not _lean_input(x):
        return None
    shape = x.shape      # (read once: each x.shape builds a torch.Size)
    if len(shape) != 3:
        return None
    c = shape[1]
    if (channels is not None and c != channels) or type(groups) is not int or groups <= 0 or c % groups:
        return None
    # the host ops (a CPU input whose reading back is free, parameters of its dtype) or any backend
    host = _host_input(x) and type(eps) in (float, int) and _host_params(c, x.dtype, weight, bias)
    if not (host or _lean_params(c, x, weight, bias)):
        return None
    mask = _lean_mask((shape[0], shape[2]), padding_mask, lengths, x, 3 if context else 0)
    if mask is None:
        return None
    if host:
        y = _host_groupwise(x, groups, weight, bias, eps, mask)
        if y is not None:
            return y
    return _run_groupwise(x, x, groups, weight, bias, eps, None if mask is False else mask, statistics=False)[0]


# The host ops of a group-wise norm (issue 27, "Hooks": a padding-safe wav2vec2's masked GroupNorm
# cost ~50 tensor ops of the composite backend against torch's one fused op). Where the mask pads each
# sequence at its end, sequence b's real steps are the slice x[b, :, :L_b]: torch's own group_norm of
# that slice is the masked group norm, and padding it back to T steps with 0 gives exact zeros there
# (a slice reads no padded step: NaN/Inf there never reach a sum, their gradient is 0). Sequences of
# equal length that are adjacent share one call.

#: above this many runs of equal lengths the composite backend op is cheaper than one call per run
_HOST_GROUP_RUNS_MAX = 8
#: the largest finite value of each host dtype (a Python float: compared on the host)
_HOST_MAX = {torch.float32: torch.finfo(torch.float32).max, torch.float64: torch.finfo(torch.float64).max}
#: the masks :func:`_host_runs` read last, newest first (:func:`~seqnorm.masks.read_once`)
_host_runs_kept = []


def _host_runs(mask: Tensor):
    """The runs of a host ``(B, T)`` mask: a tuple of ``(i, j, L)``, sequences ``i..j-1``
    all real at steps ``< L`` and padded from ``L`` on; False where a sequence has a hole
    (a padded step before a real one) or there are more than :data:`_HOST_GROUP_RUNS_MAX`
    runs. Read once per mask object and version, as :func:`~seqnorm.masks.host_rows`."""
    return read_once(_host_runs_kept, mask, _read_runs)


def _read_runs(mask: Tensor):
    runs = _context_runs(mask)
    return _mask_runs(mask) if runs is None else runs


def _context_runs(mask: Tensor):
    """:func:`_host_runs` without reading ``mask``, where it is the :func:`~seqnorm.padding`
    context's mask of host lengths (``arange(T) ≥ L_b``,
    :meth:`~seqnorm.masks.PaddingContext.host_mask_at`: a padding-safe model's norms get it,
    made anew for each batch); else None."""
    ctx = current_padding()
    if ctx is None:
        return None
    b, steps = mask.shape
    host = ctx.host_lengths_at(steps)
    if host is None or len(host) != b:
        return None
    try:
        if ctx.host_mask_at(steps, mask.device) is not mask:
            return None
    except (ValueError, TypeError):       # (the context cannot make it: read the mask itself)
        return None
    return _runs_of(host)


def _mask_runs(mask: Tensor):
    """:func:`_host_runs`, read from the mask (padding at the end only:
    :func:`~seqnorm.masks.end_padded_lengths`)."""
    lengths = end_padded_lengths(mask)
    return False if lengths is None else _runs_of(lengths.tolist())


def _runs_of(lengths) -> tuple:
    """The runs ``(i, j, L)`` of adjacent equal ``lengths`` (False past :data:`_HOST_GROUP_RUNS_MAX`)."""
    runs = []
    for b, n in enumerate(lengths):
        if runs and runs[-1][2] == n:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1, n])
    return tuple(map(tuple, runs)) if len(runs) <= _HOST_GROUP_RUNS_MAX else False


def _host_groupwise(x: Tensor, groups: int, weight, bias, eps, mask):
    r""":func:`lean_groupwise` on the host ops, or None (the backend's op): ``x (B, C, T)``
    a host input (:func:`_host_input`), ``mask`` validated (False: no padding).

    For each run of sequences ``i..j-1`` with ``L`` real steps (:func:`_host_runs`):
    ``y[i:j, :, :L] = group_norm(x[i:j, :, :L])`` — the mean and biased variance of each
    sequence's group over its ``C/G · L`` real values, as the masked statistics are — and
    ``y[i:j, :, L:] = 0`` (``constant_pad_nd``); ``L = 0``: all 0. None where the mask has
    holes or too many runs, for an empty input or where every sequence is padding (the
    backend's op keeps its autograd graph), and where a run's values are not finite."""
    b, c, t = x.shape
    if mask is False:
        runs = ((0, b, t),)
    else:
        runs = _host_runs(mask)
        if not runs or (len(runs) == 1 and runs[0][2] == 0):
            return None
    if x.numel() == 0:
        return None
    # max|x| of the whole input (padding included) read once: where even a full-length group's
    # squares cannot overflow, no run needs its own look (NaN/Inf at padding: each run looks)
    fits = _fits(_max_abs(x), c // groups * t, x.dtype)
    pieces = []
    for i, j, n in runs:
        if n == 0:
            pieces.append(x.new_zeros((j - i, c, t)))
            continue
        xr = x if n == t and j - i == b else x[i:j, :, :n]
        yr = torch.group_norm(xr, groups, weight, bias, eps) if fits else \
            _host_group_norm_run(xr, groups, weight, bias, eps, c // groups * n)
        if yr is None:
            return None
        pieces.append(yr if n == t else torch.constant_pad_nd(yr, (0, t - n)))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _max_abs(x: Tensor) -> float:
    """``max|x|`` read on the host (NaN where ``x`` holds one): one ``aminmax``, no ``abs`` copy."""
    lo, hi = torch.aminmax(x.detach())
    return max(-float(lo), float(hi))


def _fits(m: float, n: int, dtype) -> bool:
    """Whether ``n`` values of ``dtype`` with ``max|x| = m`` normalize without overflow in
    torch's kernel: ``n·(2m)²`` (a bound on the sum of squared deviations) below a quarter
    of the dtype's largest value. False for NaN (and, past ``m ~ 1e154``, where the product
    is inf in Python)."""
    return 16.0 * n * m * m < _HOST_MAX[dtype]


def _host_group_norm_run(x: Tensor, groups: int, weight, bias, eps, n: int):
    r"""``torch.group_norm`` of one run's real steps ``x``, ``n`` values per group, or None
    where a value is not finite (NaN/Inf at a real step: the backend's op decides).

    torch's CPU kernel accumulates in the input's dtype (float32 for float32), so squares of
    ``|x| ≳ 1e19`` overflow: with ``M = max|x|`` read on the host, a run with
    ``n·(2M)² ≥ max/4`` (the sum of squared deviations could come near overflow) is first
    divided by a power of two ``s ≤ M``: ``(x/s − μ/s)/√(σ²/s² + ε/s²)`` is the same
    ``x̂``, and dividing by a power of two is exact (as the backend's op does)."""
    m = _max_abs(x)
    if _fits(m, n, x.dtype):
        return torch.group_norm(x, groups, weight, bias, eps)
    if not m <= _HOST_MAX[x.dtype]:   # NaN or ±Inf
        return None
    s = math.ldexp(1.0, math.frexp(m)[1] - 1)     # 2^e ≤ m < 2^(e+1)
    return torch.group_norm(x / s, groups, weight, bias, eps / (s * s))


# ---------------------------------------------------------------------------
# Row-wise norms
# ---------------------------------------------------------------------------


def _rowwise_strided_nested(x, normalized_shape, weight, bias, eps, padding_mask, lengths, center, residual,
                            need_sum):
    """A row-wise norm of a strided nested tensor (what ``nn.TransformerEncoder``'s fast path
    passes its layers in eval): each sequence ``(T_b, D)`` alone — every row is a real token —
    nested again (``as_nested_tensor``: autograd flows through)."""
    if padding_mask is not None or lengths is not None:
        raise ValueError("input: a nested input carries its own lengths; padding_mask and lengths must be None")
    parts = x.unbind()
    if residual is None:
        return torch.nested.as_nested_tensor([_rowwise(t, normalized_shape, weight, bias, eps, None, None, center)
                                              for t in parts])
    if not (isinstance(residual, Tensor) and residual.is_nested and residual.layout == torch.strided) or [
            t.shape for t in residual.unbind()] != [t.shape for t in parts]:
        raise ValueError("residual must be a strided nested tensor with the input's sequences")
    outs = [_rowwise(t, normalized_shape, weight, bias, eps, None, None, center, r, need_sum)
            for t, r in zip(parts, residual.unbind())]
    y = torch.nested.as_nested_tensor([o[0] for o in outs])
    return y, (torch.nested.as_nested_tensor([o[1] for o in outs]) if need_sum and outs and outs[0][1] is not None
               else None)


def _rowwise(x, normalized_shape, weight, bias, eps, padding_mask, lengths, center, residual=None,
             need_sum=True):
    if is_jagged(x):   # every row of values() is a real token
        values, _ = unpack(x, "input", padding_mask, lengths)
        res = None
        if residual is not None:
            if not is_jagged(residual) or not torch.equal(residual.offsets(), x.offsets()):
                raise ValueError("residual must be a nested jagged tensor with the input's sequences")
            res = unpack(residual, "residual")[0]
        out = _rowwise(values, normalized_shape, weight, bias, eps, None, None, center, res, need_sum)
        if residual is None:
            return pack(out, x)
        return pack(out[0], x), (None if out[1] is None else pack(out[1], x))
    if isinstance(x, Tensor) and x.is_nested and x.layout == torch.strided:
        return _rowwise_strided_nested(x, normalized_shape, weight, bias, eps, padding_mask, lengths, center,
                                       residual, need_sum)
    check_input(x)
    shape, token_shape, d = split_rowwise(x, normalized_shape)
    check_param(weight, "weight", shape, x)
    check_param(bias, "bias", shape, x)
    if residual is not None:
        check_input(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must have the input's shape {shape_str(x.shape)} and dtype {x.dtype}, "
                f"got {shape_str(residual.shape)} and {residual.dtype}"
            )
    pad = resolve_padding(token_shape, x.device, padding_mask, lengths,
                          what="input.shape[:-len(normalized_shape)]")
    return _run_rowwise(x, math.prod(token_shape), d, weight, bias, eps, pad, center, residual, need_sum)


def _run_rowwise(x, rows: int, d: int, weight, bias, eps, pad, center, residual, need_sum):
    """The tail of both paths: the backend's row-wise op on ``x`` as ``(rows, d)`` with the
    validated token mask ``pad`` (or None); ``(y, s)`` given a ``residual``."""
    backend = backends.current_backend(x)
    if _takes_tokens(backend, x, d):
        # the backend reads x (*, D) and the token mask as they are, parameters in their dtype,
        # and returns y in x's shape
        # (the (d,) parameters the lean path checked passed as they are: no call per parameter)
        w = weight if weight is None or weight.dim() == 1 else weight.reshape(d)
        b = bias if bias is None or bias.dim() == 1 else bias.reshape(d)
        if residual is None:
            return backend.rowwise_norm(x, w, b, eps, pad, center)
        return backend.add_rowwise_norm(x, residual, w, b, eps, pad, center, need_sum)
    backend, x2, _ = _backend_and_rows(x, rows, d)
    pad1 = flat_padding(pad, rows)
    cdt = compute_dtype(x)
    native = x.dtype in backend.native_low_precision
    param = _params_for(backend, cdt)
    w, b = _vector(weight, d, param), _vector(bias, d, param)
    if residual is None:
        return _as_input(backend.rowwise_norm(x2, w, b, eps, pad1, center), x)
    # Low-precision inputs are summed in float32 too: the norm sees the exact sum,
    # and the returned residual stream is rounded once, like the output.
    r2 = residual.reshape(rows, d) if native else residual.reshape(rows, d).to(cdt)
    y, s = backend.add_rowwise_norm(x2, r2, w, b, eps, pad1, center, need_sum)
    return _as_input(y, x), (None if s is None else _as_input(s, x))


def layer_norm(
    input: Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    padding_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    r"""Layer normalization over the last ``len(normalized_shape)`` dimensions.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    The mean and the *biased* variance are taken over the normalized
    dimensions of each token separately (the note: each row of a
    ``(seq_len, d_model)`` matrix). Without padding this is
    ``torch.nn.functional.layer_norm``, bit for bit for float32/float64.

    Args:
        input: ``(*, *normalized_shape)``.
        normalized_shape: int or sequence, the trailing dimensions to normalize.
        weight: ``γ`` of shape ``normalized_shape``, or None (no scaling).
        bias: ``β`` of shape ``normalized_shape``, or None (no shift).
        eps: added to the variance. Default: 1e-5.
        padding_mask: bool tensor of shape ``input.shape[:-len(normalized_shape)]``
            (``(B, T)`` for a ``(B, T, D)`` input), True at padding. Padded
            tokens come out as exactly 0 and receive gradient 0.
        lengths: ``(B,)`` integer tensor, an alternative to ``padding_mask``
            for a ``(B, T, *normalized_shape)`` input.

    Shape:
        - Input: ``(*, *normalized_shape)``
        - Output: same as input

    Example::

        >>> x = torch.tensor([[1., 2.], [3., 4.]])
        >>> layer_norm(x, (2,), eps=0.0)
        tensor([[-1.,  1.],
                [-1.,  1.]])
    """
    y = lean_rowwise(input, _shape(normalized_shape), weight, bias, eps, padding_mask, lengths, True)
    return y if y is not None else _rowwise(input, normalized_shape, weight, bias, eps, padding_mask, lengths,
                                            center=True)


def _shape(normalized_shape) -> tuple:
    """``normalized_shape`` as the lean path compares it: an int as a 1-tuple, a tuple or
    torch.Size as it is (anything else goes to the general path, which parses it)."""
    if type(normalized_shape) is int:
        return (normalized_shape,)
    return normalized_shape if isinstance(normalized_shape, tuple) else ()


def _rms_eps(eps: Optional[float], x: Tensor) -> float:
    # torch's default: the machine epsilon of the *input* dtype, even though a
    # bfloat16 input is computed in float32 here.
    return torch.finfo(x.dtype).eps if eps is None else eps


def rms_norm(
    input: Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    padding_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    offset: float = 0.0,
    casting: str = "float32",
) -> Tensor:
    r"""Root-mean-square normalization over the last ``len(normalized_shape)`` dimensions.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} * \gamma

    No mean is subtracted; the quadratic mean is taken over each token's
    normalized dimensions. Without padding this is ``torch.nn.functional.rms_norm``.

    Args:
        input: ``(*, *normalized_shape)``.
        normalized_shape: int or sequence, the trailing dimensions to normalize.
        weight: ``γ`` of shape ``normalized_shape``, or None.
        eps: added to the mean square. Default: ``torch.finfo(input.dtype).eps``.
        padding_mask: bool, shape ``input.shape[:-len(normalized_shape)]``, True at padding.
        lengths: ``(B,)`` integer tensor, alternative to ``padding_mask``.
        offset: ``y = x̂ ⊙ (offset + γ)``: 0.0, or 1.0 for a zero-centred ``γ`` (Gemma).
            Default: 0.0.
        casting: ``"float32"`` (everything in float32, rounded once) or ``"llama"`` (``x̂``
            rounded to a 16-bit input's dtype before ``γ``), see :mod:`seqnorm.rms_variants`.
            Default: ``"float32"``.

    Shape:
        - Input: ``(*, *normalized_shape)``
        - Output: same as input

    Example::

        >>> rms_norm(torch.tensor([[3., 4.]]), (2,), eps=0.0)
        tensor([[0.8485, 1.1314]])
    """
    after = None
    if offset or casting != "float32":    # the language models' variants: a folded γ, or γ after the cast
        weight, after = rms_affine(input, weight, offset, casting)
    y = lean_rowwise(input, _shape(normalized_shape), weight, None, eps, padding_mask, lengths, False)
    y = y if y is not None else _rowwise(input, normalized_shape, weight, None, _rms_eps(eps, input),
                                         padding_mask, lengths, center=False)
    return y if after is None else after(y)


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    prenorm: bool = False,
    padding_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""The Transformer's "Add & Norm": ``layer_norm(input + residual)``, in one op.

    .. math::
        s = x + r, \qquad y = \frac{s - \mathrm{E}[s]}{\sqrt{\mathrm{Var}[s] + \epsilon}} * \gamma + \beta

    Args:
        input: the sub-layer output ``x``, ``(*, *normalized_shape)``.
        residual: the residual stream ``r``, same shape and dtype as ``input``.
        normalized_shape, weight, bias, eps, padding_mask, lengths: as in
            :func:`layer_norm`.
        prenorm: if True return ``(y, s)`` — the normalized sum and the sum
            itself, the next residual stream of a pre-norm Transformer (as
            flash-attn's ``layer_norm_fn``). ``s`` is the plain sum at every
            position, padding included: it is not normalized.

    Shape:
        - Input, residual: ``(*, *normalized_shape)``
        - Output: same as input (a pair when ``prenorm``)

    Example::

        >>> x, r = torch.tensor([[0., 1.]]), torch.tensor([[1., 1.]])
        >>> add_layer_norm(x, r, 2, eps=0.0)
        tensor([[-1.,  1.]])
    """
    out = lean_rowwise(input, _shape(normalized_shape), weight, bias, eps, padding_mask, lengths, True, residual,
                       prenorm)
    y, s = out if out is not None else _rowwise(input, normalized_shape, weight, bias, eps, padding_mask, lengths,
                                                center=True, residual=residual, need_sum=prenorm)
    return (y, s) if prenorm else y


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    prenorm: bool = False,
    padding_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    offset: float = 0.0,
    casting: str = "float32",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""``rms_norm(input + residual)`` in one op; ``prenorm=True`` also returns the sum.

    .. math::
        s = x + r, \qquad y = \frac{s}{\sqrt{\mathrm{E}[s^2] + \epsilon}} * \gamma

    Args: as :func:`add_layer_norm` without ``bias``; ``eps`` defaults to
    ``torch.finfo(input.dtype).eps``; ``offset`` and ``casting`` as in :func:`rms_norm`.

    Shape:
        - Input, residual: ``(*, *normalized_shape)``
        - Output: same as input (a pair when ``prenorm``)

    Example::

        >>> y, s = add_rms_norm(torch.ones(1, 2), torch.ones(1, 2), 2, eps=0.0, prenorm=True)
        >>> y, s
        (tensor([[1., 1.]]), tensor([[2., 2.]]))
    """
    after = None
    if offset or casting != "float32":    # as in rms_norm
        weight, after = rms_affine(input, weight, offset, casting)
    out = lean_rowwise(input, _shape(normalized_shape), weight, None, eps, padding_mask, lengths, False, residual,
                       prenorm)
    y, s = out if out is not None else _rowwise(input, normalized_shape, weight, None, _rms_eps(eps, input),
                                                padding_mask, lengths, center=False, residual=residual,
                                                need_sum=prenorm)
    y = y if after is None else after(y)
    return (y, s) if prenorm else y


# ---------------------------------------------------------------------------
# Feature-wise norms
# ---------------------------------------------------------------------------


def _featurewise_setup(x, padding_mask, lengths, params, op_name, reduce):
    """Validate a ``(B, T, D)`` or ``(N, D)`` input and its per-feature tensors."""
    check_featurewise_input(x, op_name)
    d = x.shape[-1]
    for name, p in params.items():
        check_param(p, name, (d,), x)
    token_shape = tuple(x.shape[:-1])
    pad = resolve_padding(token_shape, x.device, padding_mask, lengths,
                          what="(B, T)" if x.dim() == 3 else "(N,)")
    backend, x2, _ = _backend_and_rows(x, math.prod(token_shape), d, reduce)
    pad1 = flat_padding(pad, x2.shape[0])
    return backend, x2, pad1, compute_dtype(x)


def seq_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    padding_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
    reduce: Optional[StatsReduce] = None,
) -> Tensor:
    r"""Batch normalization of token features, statistics over real tokens only.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    For each feature ``d`` the mean and *biased* variance are taken over every
    real token of every sequence in the batch (the note: each column, pooled
    across sentences), never over padding. In training, or when no running
    statistics are given, the batch statistics are used; the running
    statistics, if given, are then updated in place from the real tokens:
    ``running = (1 − momentum)·running + momentum·batch``, with the unbiased
    (n/(n − 1)) variance as torch stores it. A batch with no real token
    returns zeros and leaves the running statistics untouched; so does a batch
    whose statistics are NaN/Inf (with a warning; see
    :func:`update_running_stats`). In eval mode the running statistics are used.

    Args:
        input: ``(B, T, D)`` batch-first sequences, or ``(N, D)`` tokens.
        running_mean, running_var: ``(D,)`` tensors or None.
        weight, bias: ``(D,)`` or None.
        training: use (and record) batch statistics. Default: False.
        momentum: weight of the new batch in the running average, or None for a
            cumulative average (needs ``num_batches_tracked``). Default: 0.1.
        eps: added to the variance. Default: 1e-5.
        padding_mask: bool ``(B, T)`` (or ``(N,)``), True at padding.
        lengths: ``(B,)`` integers, alternative to ``padding_mask``.
        num_batches_tracked: 0-d long tensor, incremented when the running
            statistics are updated (the module's buffer).
        reduce: how this process's statistics become the batch's: None (this
            process holds the whole batch) or a
            :class:`~seqnorm.backends.torch.StatsReduce` hook
            (:class:`~seqnorm.SyncSeqBatchNorm` passes its collectives).

    Raises:
        ValueError: in training, when exactly one real token is present
            (its variance is undefined, as torch's "Expected more than 1 value
            per channel when training").

    Shape:
        - Input: ``(B, T, D)`` or ``(N, D)``
        - Output: same as input

    Example::

        >>> x = torch.tensor([[[1., 2.], [3., 4.]], [[2., 3.], [1., 4.]]])
        >>> y = seq_batch_norm(x, None, None, training=True, eps=0.0)
        >>> y[..., 0]   # feature 0 pools four tokens: mean 1.75, std 0.8292
        tensor([[-0.9045,  1.5076],
                [ 0.3015, -0.9045]])
    """
    if is_jagged(input):   # the real tokens are values(), as an (N, D) batch
        values, _ = unpack(input, "seq_batch_norm", padding_mask, lengths)
        return pack(seq_batch_norm(values, running_mean, running_var, weight, bias, training, momentum, eps,
                                   num_batches_tracked=num_batches_tracked, reduce=reduce), input)
    if reduce is None:
        y = lean_seq_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                padding_mask, lengths, num_batches_tracked)
        if y is not None:
            return y
    backend, x2, pad, cdt = _featurewise_setup(
        input, padding_mask, lengths,
        dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias),
        "seq_batch_norm", reduce,
    )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    check_momentum(momentum)
    return _run_seq_batch_norm(input, backend, x2, pad, cdt, running_mean, running_var, weight, bias, training,
                               momentum, eps, num_batches_tracked, reduce)


def _run_seq_batch_norm(input, backend, x2, pad, cdt, running_mean, running_var, weight, bias, training, momentum,
                        eps, num_batches_tracked, reduce):
    """The tail of both paths: the backend's masked BatchNorm of ``x2 (N, D)`` with the flat
    mask ``pad``, and the running statistics' update (see :mod:`seqnorm.running`)."""
    use_batch_stats = training or running_mean is None
    param = _params_for(backend, cdt)
    mean = var = None
    if not use_batch_stats:
        mean, var = param(running_mean), param(running_var)
    host_step = getattr(backend, "featurewise_train_on_host", None) if use_batch_stats and reduce is None \
        else None
    if host_step is not None:   # CPU: the padding and statistics are read on the host (seqnorm.running)
        y = host_step(x2, param(weight), param(bias), eps, pad, running_mean if training else None,
                      running_var, num_batches_tracked, momentum)
        if y is not None:
            return _as_input(y, input)
    fused = training and running_mean is not None and _fuses_update(backend, x2, reduce, momentum,
                                                                     num_batches_tracked)
    if fused:
        y, batch_mean, batch_var, count = backend.featurewise_norm(
            x2, param(weight), param(bias), eps, pad, mean, var, reduce,
            (running_mean, running_var, num_batches_tracked, momentum))
    else:   # (no running= keyword: a third-party backend may not take it)
        y, batch_mean, batch_var, count = backend.featurewise_norm(x2, param(weight), param(bias), eps, pad, mean,
                                                                   var, reduce)
    if training and not fused:   # (the policy reads count on the CPU only: see seqnorm.running; a fused
        # update is the sync-free policy's, where count is not read — the backend returns None for it)
        if not running_policy.sync_free(count):   # (the message built only where it may be raised)
            check_real_tokens(count, f"seq_batch_norm (input {tuple(input.shape)})")
        if running_mean is not None:
            update_batch_norm_stats(running_mean, running_var, batch_mean, batch_var, count, momentum,
                                    num_batches_tracked)
    return _as_input(y, input)


def power_norm(
    input: Tensor,
    running_phi: Tensor,
    running_nu: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    padding_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
    reduce: Optional[StatsReduce] = None,
) -> Tensor:
    r"""Power normalization (Shen et al., ICML 2020, Algorithm 1), exactly masked.

    .. math::
        \hat{x} = \frac{x}{\sqrt{\psi^2_{t-1} + \epsilon}}, \qquad y = \gamma \hat{x} + \beta,
        \qquad \psi^2_t = (1 - m)\,\psi^2_{t-1} + m\,\psi_B^2, \quad
        \psi_B^2 = \frac{1}{n}\sum_{\text{real } i} x_i^2

    No mean is subtracted, and both training and eval divide by the *running*
    quadratic mean ``ψ²`` (``running_phi``); training then updates it from the
    real tokens (``m`` = ``momentum`` = 1 − α in the paper). In training the
    backward is the paper's approximate backpropagation: with ``g = γ ⊙ ∂L/∂y``
    it returns ``(g − ν ⊙ x̂)/√(ψ² + ε)`` and updates ``running_nu`` in place,
    ``ν ← ν(1 − m·mean(x̂²)) + m·mean(x̂ ⊙ g)``, means over real tokens. With
    ``running_nu=None`` (or in eval) the backward is the exact gradient of the
    forward with ψ held constant.

    Unlike the paper's public code, the backward statistics exclude padding.

    Args:
        input: ``(B, T, D)`` or ``(N, D)``.
        running_phi: ``(D,)`` running quadratic mean ψ², updated in training.
        running_nu: ``(D,)`` running gradient statistic ν, or None.
        weight, bias: ``(D,)`` or None.
        training: update ψ² (forward) and ν (backward). Default: False.
        momentum: ``1 − α``, or None for a cumulative average (needs
            ``num_batches_tracked``). Default: 0.1 (the paper's α = 0.9).
        eps: added to ψ². Default: 1e-5.
        padding_mask: bool ``(B, T)`` (or ``(N,)``), True at padding.
        lengths: ``(B,)`` integers, alternative to ``padding_mask``.
        num_batches_tracked: 0-d long tensor, incremented when ψ² is updated.
        reduce: None, or a :class:`~seqnorm.backends.torch.StatsReduce` hook
            (:class:`~seqnorm.SyncPowerNorm` passes its collectives).

    Shape:
        - Input: ``(B, T, D)`` or ``(N, D)``
        - Output: same as input

    Example::

        >>> phi = torch.full((2,), 4.0)
        >>> power_norm(torch.tensor([[2., -4.]]), phi, eps=0.0)
        tensor([[ 1., -2.]])
    """
    if not isinstance(running_phi, torch.Tensor):
        raise TypeError("running_phi must be a (D,) tensor (the running quadratic mean ψ²)")
    if is_jagged(input):
        values, _ = unpack(input, "power_norm", padding_mask, lengths)
        return pack(power_norm(values, running_phi, running_nu, weight, bias, training, momentum, eps,
                               num_batches_tracked=num_batches_tracked, reduce=reduce), input)
    run = _power_norm_training if training else _power_norm
    return run(input, running_phi, running_nu, weight, bias, training, momentum, eps, padding_mask, lengths,
               num_batches_tracked, reduce)


def _power_norm(input, running_phi, running_nu, weight, bias, training, momentum, eps, padding_mask, lengths,
                num_batches_tracked, reduce):
    if reduce is None:
        y = lean_power_norm(input, running_phi, running_nu, weight, bias, training, momentum, eps, padding_mask,
                            lengths, num_batches_tracked)
        if y is not None:
            return y
    backend, x2, pad, cdt = _featurewise_setup(
        input, padding_mask, lengths,
        dict(running_phi=running_phi, running_nu=running_nu, weight=weight, bias=bias),
        "power_norm", reduce,
    )
    check_momentum(momentum)
    return _run_power_norm(input, backend, x2, pad, cdt, running_phi, running_nu, weight, bias, training, momentum,
                           eps, num_batches_tracked, reduce)


def _run_power_norm(input, backend, x2, pad, cdt, running_phi, running_nu, weight, bias, training, momentum, eps,
                    num_batches_tracked, reduce):
    """The tail of both paths: the backend's PowerNorm of ``x2 (N, D)`` with the flat mask
    ``pad``, and ψ²'s update (see :mod:`seqnorm.running`)."""
    param = _params_for(backend, cdt)
    if training and _fuses_update(backend, x2, reduce, momentum, num_batches_tracked):
        # the backend forms the step's weight and moves ψ² and the counter in its finalize kernel
        y = backend.power_norm(x2, param(weight), param(bias), eps, pad, running_phi, running_nu, None,
                               reduce=reduce, running=(momentum, num_batches_tracked))[0]
        return _as_input(y, input)
    # ν's update in the backward uses the same weight as ψ²'s update here
    factor = momentum_factor(momentum, num_batches_tracked) if training else 0.0
    y, batch_phi, count = backend.power_norm(
        x2, param(weight), param(bias), eps, pad, running_phi,
        running_nu if training else None, factor, reduce=reduce,
        **({"training": training} if getattr(backend, "fuses_running_update", False) else {}),
    )
    if training:
        update_running_stats([(running_phi, batch_phi)], count, momentum, num_batches_tracked)
    return _as_input(y, input)


# Training runs eagerly even inside torch.compile: the output divides by the running ψ² that
# the same step then updates in place, and a compiled backward (torch 2.13) was measured to
# read the *updated* ψ² — input gradients off by the step's change of 1/√ψ². The graph breaks
# around PowerNorm's training step instead (fullgraph=True cannot hold it); eval compiles whole.
_power_norm_training = torch.compiler.disable(_power_norm)


# ---------------------------------------------------------------------------
# Group-wise norms: statistics per sequence, over time × a group of channels
# ---------------------------------------------------------------------------


def _check_groups(groups, c: int, who: str, what) -> None:
    """``what``: the input's shape, or words for it (formatted only on error: ``int()`` of
    a size traced by torch.compile would fix it to the traced value)."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0 or c % groups:
        what = what if isinstance(what, str) else f"input {shape_str(what)}"
        raise ValueError(f"{who}: num_groups must be a positive int dividing the {c} channels of {what}, "
                         f"got {groups!r}")


_NO_GROUPS = object()   # _channels_first_setup without a num_groups to check


def _channels_first_setup(x: Tensor, weight, bias, padding_mask, lengths, who: str, groups=_NO_GROUPS):
    """Validate a channels-first ``(N, C, *)`` input, its ``num_groups`` (when
    given) and its ``(C,)`` parameters; return it as ``(N, C, L)`` and its
    validated ``(N, L)`` padding (padding needs a 3-D input)."""
    check_input(x)
    if x.dim() < 2:
        raise ValueError(f"{who} expects input of shape (N, C, *), got {shape_str(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    if groups is not _NO_GROUPS:
        _check_groups(groups, c, who, x.shape)
    check_param(weight, "weight", (c,), x)
    check_param(bias, "bias", (c,), x)
    if (padding_mask is not None or lengths is not None) and x.dim() != 3:
        raise ValueError(f"{who}: padding_mask/lengths need input of shape (N, C, L) (padding_mask (N, L)), "
                         f"got {shape_str(x.shape)}")
    x3 = x.reshape(n, c, math.prod(x.shape[2:]))
    return x3, resolve_padding((n, x3.shape[2]), x.device, padding_mask, lengths, what="(N, L)")


def _groupwise(x: Tensor, groups, weight, bias, eps, padding_mask, lengths, who: str):
    """Validate a channels-first ``(N, C, *)`` input, run the backend's
    ``groupwise_norm`` on it as ``(N, C, L)``; returns ``(y, mean, var, count)``
    with ``y`` in the input's shape and dtype."""
    x3, pad = _channels_first_setup(x, weight, bias, padding_mask, lengths, who, groups)
    return _run_groupwise(x, x3, groups, weight, bias, eps, pad)


def _run_groupwise(x, x3, groups, weight, bias, eps, pad, statistics: bool = True):
    """The tail of both paths: the backend's ``groupwise_norm`` of ``x3 (N, C, L)`` with the
    validated ``(N, L)`` mask ``pad``; ``(y, mean, var, count)``, ``y`` as ``x``
    (``statistics=False``: the caller reads ``y`` alone, and a backend with
    ``optional_group_statistics`` may return None for the rest)."""
    cdt = compute_dtype(x)
    backend = _backend_for(x3, op="groupwise_norm")
    if x.dtype != cdt and x.dtype not in backend.native_low_precision:
        x3 = x3.to(cdt)
        backend = _backend_for(x3, op="groupwise_norm")
    param = _params_for(backend, cdt)
    if not statistics and getattr(backend, "optional_group_statistics", False):
        y, mean, var, count = backend.groupwise_norm(x3, param(weight), param(bias), eps, pad, groups,
                                                     statistics=False)
    else:
        y, mean, var, count = backend.groupwise_norm(x3, param(weight), param(bias), eps, pad, groups)
    return _as_input(y, x), mean, var, count


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    padding_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    r"""Group normalization, statistics over each sequence's real time steps.

    .. math::
        y_{bct} = \frac{x_{bct} - \mathrm{E}_{bg}[x]}{\sqrt{\mathrm{Var}_{bg}[x] + \epsilon}}\,\gamma_c + \beta_c

    The ``C`` channels form ``num_groups`` groups of ``C/num_groups``
    consecutive channels; the mean and *biased* variance of sequence ``b``'s
    group ``g`` are taken over the group's channels × the sequence's real time
    steps only — a sequence's output does not depend on its padding, nor on the
    other sequences. Padded steps come out as exactly 0 with gradient 0.
    Without padding this is ``torch.nn.functional.group_norm``.

    Args:
        input: ``(N, C, *)``, channels first as torch's; with padding ``(N, C, L)``.
        num_groups: the number of groups; must divide ``C``.
        weight, bias: ``(C,)`` or None.
        eps: added to the variance. Default: 1e-5.
        padding_mask: bool ``(N, L)``, True at padding.
        lengths: ``(N,)`` integers, alternative to ``padding_mask``.

    Shape:
        - Input: ``(N, C, *)``; ``(N, C, L)`` with padding
        - Output: same as input

    Example::

        >>> x = torch.tensor([[[1., 3., 100.], [2., 4., -100.]]])     # (N=1, C=2, L=3)
        >>> group_norm(x, 1, eps=0.0, lengths=torch.tensor([2]))     # the pad is not pooled
        tensor([[[-1.3416,  0.4472,  0.0000],
                 [-0.4472,  1.3416,  0.0000]]])
    """
    if is_jagged(input):
        return _jagged_groupwise(input, num_groups, weight, bias, eps, padding_mask, lengths, "group_norm")[0]
    y = lean_groupwise(input, num_groups, weight, bias, eps, padding_mask, lengths)
    if y is not None:
        return y
    return _groupwise(input, num_groups, weight, bias, eps, padding_mask, lengths, "group_norm")[0]


def instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    padding_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    r"""Instance normalization: each channel of each sequence over its real time steps.

    .. math::
        y_{bct} = \frac{x_{bct} - \mathrm{E}_{bc}[x]}{\sqrt{\mathrm{Var}_{bc}[x] + \epsilon}}\,\gamma_c + \beta_c

    :func:`group_norm` with one group per channel. With ``use_input_stats``
    (training, or no running statistics) each instance's own mean and biased
    variance are used, and the running statistics, if given, move as torch's
    do: towards the mean over the batch of the instances' means and *unbiased*
    variances (``σ²·n/(n − 1)`` with ``n`` a sequence's real steps; sequences
    with fewer than 2 real steps take no part, and a batch without any changes
    nothing). With ``use_input_stats=False`` the running statistics normalize.

    Args:
        input: ``(N, C, *)``; with padding ``(N, C, L)``.
        running_mean, running_var: ``(C,)`` or None.
        weight, bias: ``(C,)`` or None.
        use_input_stats: normalize with each instance's statistics. Default: True.
        momentum: weight of the new batch, or None for a cumulative average
            (needs ``num_batches_tracked``). Default: 0.1.
        eps: added to the variance. Default: 1e-5.
        padding_mask: bool ``(N, L)``, True at padding; lengths: ``(N,)``.
        num_batches_tracked: 0-d long tensor, incremented when the running
            statistics move.

    Shape:
        - Input: ``(N, C, *)``; ``(N, C, L)`` with padding
        - Output: same as input

    Example::

        >>> x = torch.tensor([[[1., 3., 7.]]])
        >>> instance_norm(x, eps=0.0, padding_mask=torch.tensor([[False, False, True]]))
        tensor([[[-1.,  1.,  0.]]])
    """
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    check_momentum(momentum)
    jagged = is_jagged(input)
    c = input.shape[2 if jagged else 1] if isinstance(input, torch.Tensor) and input.dim() >= 2 else None
    if c is not None:
        check_param(running_mean, "running_mean", (c,), input)
        check_param(running_var, "running_var", (c,), input)
    if not use_input_stats:
        if running_mean is None:
            raise ValueError("instance_norm(use_input_stats=False) needs running_mean and running_var")
        if jagged:
            values, _ = unpack(input, "instance_norm", padding_mask, lengths)
            return pack(_instance_norm_running(values.t().unsqueeze(0), running_mean, running_var, weight, bias,
                                               eps, None, None)[0].t(), input)
        return _instance_norm_running(input, running_mean, running_var, weight, bias, eps, padding_mask,
                                      lengths)
    if running_mean is None and not jagged and c is not None:
        y = lean_groupwise(input, c, weight, bias, eps, padding_mask, lengths)
        if y is not None:
            return y
    groupwise = _jagged_groupwise if jagged else _groupwise
    y, mean, var, steps = groupwise(input, c, weight, bias, eps, padding_mask, lengths, "instance_norm")
    if running_mean is not None:
        backend = _backend_for(mean, op="instance_running_update")
        if hasattr(backend, "instance_running_update") and \
                _fuses_update(backend, mean, None, momentum, num_batches_tracked):   # one kernel, as below
            backend.instance_running_update(mean, var, steps, running_mean, running_var, num_batches_tracked,
                                            momentum)
            return y
        # Each instance with ≥ 2 real steps contributes its mean and unbiased variance, weighted alike.
        with torch.no_grad():
            used = steps >= 2                                                          # N
            k = used.sum()
            w = used.to(mean.dtype).unsqueeze(1) / k.clamp_min(1).to(mean.dtype)       # N,1
            n = steps.to(var.dtype).unsqueeze(1)
            unbiased = var * (n / (n - 1).clamp_min(1))
            batch_mean = (mean.masked_fill(~used.unsqueeze(1), 0) * w).sum(0)
            batch_var = (unbiased.masked_fill(~used.unsqueeze(1), 0) * w).sum(0)
        update_running_stats([(running_mean, batch_mean), (running_var, batch_var)], k, momentum,
                             num_batches_tracked)
    return y


def _jagged_groupwise(x: Tensor, groups, weight, bias, eps, padding_mask, lengths, who: str):
    """:func:`_groupwise` of a channels-last jagged ``(B, j, C)``: each sequence's
    segment of ``values()`` reduced by :func:`~seqnorm.nested.segment_sums`, with the
    corrected two-pass formula of :func:`~seqnorm.backends.torch.group_moments`
    (composite torch ops; autograd differentiates them)."""
    values, offsets = unpack(x, who, padding_mask, lengths)
    check_input(values)
    total, c = values.shape
    _check_groups(groups, c, who, f"the jagged input (B, j, {c})")
    check_param(weight, "weight", (c,), values)
    check_param(bias, "bias", (c,), values)
    batch, cg, cdt = offsets.shape[0] - 1, c // groups, compute_dtype(values)
    ids = segment_ids(offsets, total)
    steps = offsets[1:] - offsets[:-1]
    n = (steps * cg).clamp_min(1).to(cdt).unsqueeze(1)                         # B,1
    v = values.to(cdt).reshape(total, groups, cg)                               # N,G,Cg
    m1 = segment_sums(v.sum(2), ids, batch) / n                                 # B,G
    delta = v - m1[ids].unsqueeze(2)
    correction = segment_sums(delta.sum(2), ids, batch) / n
    var = (segment_sums((delta * delta).sum(2), ids, batch) / n - correction * correction).clamp_min(0)
    mean = m1 + correction
    xhat = (v - mean[ids].unsqueeze(2)) * torch.rsqrt(var + eps)[ids].unsqueeze(2)
    y = xhat if weight is None else xhat * weight.to(cdt).reshape(1, groups, cg)
    y = y if bias is None else y + bias.to(cdt).reshape(1, groups, cg)
    return pack(y.reshape(total, c).to(values.dtype), x), mean.detach(), var.detach(), steps


def _instance_norm_running(x, running_mean, running_var, weight, bias, eps, padding_mask, lengths):
    """Eval with running statistics: a per-channel affine map, 0 at padding."""
    x3, pad = _channels_first_setup(x, weight, bias, padding_mask, lengths, "instance_norm")
    cdt = compute_dtype(x)
    x3 = x3.to(cdt)
    if pad is not None:
        x3 = x3.masked_fill(pad.unsqueeze(1), 0)
    y = (x3 - running_mean.to(cdt).unsqueeze(1)) * torch.rsqrt(running_var.to(cdt) + eps).unsqueeze(1)
    if weight is not None:
        y = y * weight.to(cdt).unsqueeze(1)
    if bias is not None:
        y = y + bias.to(cdt).unsqueeze(1)
    if pad is not None:
        y = y.masked_fill(pad.unsqueeze(1), 0)
    return _as_input(y, x)
