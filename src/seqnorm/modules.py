"""nn.Module wrappers. Arguments, defaults, parameter and buffer names mirror
torch.nn.LayerNorm, torch.nn.RMSNorm and torch.nn.BatchNorm1d, so a state_dict
loads both ways; every ``forward`` also takes ``padding_mask`` or ``lengths``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F
from .checks import check_num_features
from .masks import padding_for_channels_first, padding_for_features, padding_for_rows
from .rms_variants import check_offset_casting, variant_repr
from .running import check_momentum

__all__ = ["LayerNorm", "RMSNorm", "AddNorm", "FeaturewiseNorm", "SeqBatchNorm", "PowerNorm", "GroupNorm",
           "InstanceNorm1d"]

Tensor = torch.Tensor


_MISSING = object()


# Every module call first takes the lean path of seqnorm.functional (issues 16 and 27: host time per call,
# on every device), which reads a module's parameters and buffers from its ``_parameters`` / ``_buffers``,
# where ``module.weight`` goes through ``nn.Module.__getattr__`` (~1 µs each). Only for a module of exactly
# its seqnorm class — a parametrized or FSDP module is a generated subclass whose ``weight`` may be a
# property; a name that is not there gives ``_MISSING`` (or None for a running statistic), and the lean path
# declines: the general path reads ``module.weight``.


class LayerNorm(nn.LayerNorm):
    r"""Padding-aware :class:`torch.nn.LayerNorm` (a subclass: same arguments,
    parameters, state_dict and ``isinstance``).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    The mean and biased variance are taken over the last
    ``len(normalized_shape)`` dimensions of each token separately, so a token's
    output never depends on the other tokens, on padding or on the batch.

    Args:
        normalized_shape: int or sequence, the trailing dimensions to normalize.
        eps: added to the variance. Default: 1e-5.
        elementwise_affine: learnable ``γ`` (ones) and ``β`` (zeros). Default: True.
        bias: with ``elementwise_affine``, whether ``β`` exists. Default: True.

    Shape:
        - Input: ``(*, *normalized_shape)``; ``padding_mask``: ``input.shape[:-len(normalized_shape)]``
        - Output: same as input; exactly 0 at padding

    Example::

        >>> ln = LayerNorm(2, eps=0.0)
        >>> x = torch.tensor([[[1., 2.], [3., 4.], [9., 9.]]])      # (B=1, T=3, D=2)
        >>> ln(x, padding_mask=torch.tensor([[False, False, True]])).detach()
        tensor([[[-1.,  1.],
                 [-1.,  1.],
                 [ 0.,  0.]]])
    """

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        if type(self) is LayerNorm:   # the lean path (see above)
            params = self._parameters
            y = F.lean_rowwise(input, self.normalized_shape, params.get("weight", _MISSING),
                               params.get("bias", _MISSING), self.eps, padding_mask, lengths, True, context=True)
            if y is not None:
                return y
        padding_mask, lengths = padding_for_rows(input, len(self.normalized_shape), padding_mask, lengths)
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                            padding_mask=padding_mask, lengths=lengths)


class RMSNorm(nn.RMSNorm):
    r"""Padding-aware :class:`torch.nn.RMSNorm` (a subclass).

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} * (\mathrm{offset} + \gamma)

    Args:
        normalized_shape: int or sequence, the trailing dimensions to normalize.
        eps: added to the mean square. Default: ``torch.finfo(x.dtype).eps``.
        elementwise_affine: learnable ``γ`` (``1 - offset``: ones, or zeros for a
            zero-centred ``γ``). Default: True.
        offset: 0.0, or 1.0 for a zero-centred ``γ`` applied as ``1 + γ`` (Gemma).
            Default: 0.0.
        casting: ``"float32"`` or ``"llama"``: where a 16-bit input is rounded
            (:mod:`seqnorm.rms_variants`). Default: ``"float32"``.

    Shape:
        - Input: ``(*, *normalized_shape)``; ``padding_mask``: ``input.shape[:-len(normalized_shape)]``
        - Output: same as input; exactly 0 at padding

    Example::

        >>> rms = RMSNorm(2, eps=0.0)
        >>> rms(torch.tensor([[3., 4.]]), lengths=None).detach()
        tensor([[0.8485, 1.1314]])
    """

    offset = 0.0          # (modules pickled before the language models' variants existed)
    casting = "float32"

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, offset: float = 0.0, casting: str = "float32") -> None:
        self.offset = check_offset_casting(offset, casting, elementwise_affine)
        self.casting = casting
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.offset and self.weight is not None:     # offset + γ starts at 1
            nn.init.constant_(self.weight, 1.0 - self.offset)

    def extra_repr(self) -> str:
        return super().extra_repr() + variant_repr(self.offset, self.casting)

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        if self.offset or self.casting != "float32":    # the language models' variants: the functional call
            padding_mask, lengths = padding_for_rows(input, len(self.normalized_shape), padding_mask, lengths)
            return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, padding_mask=padding_mask,
                              lengths=lengths, offset=self.offset, casting=self.casting)
        if type(self) is RMSNorm:     # the lean path (see above)
            y = F.lean_rowwise(input, self.normalized_shape, self._parameters.get("weight", _MISSING), None,
                               self.eps, padding_mask, lengths, False, context=True)
            if y is not None:
                return y
        padding_mask, lengths = padding_for_rows(input, len(self.normalized_shape), padding_mask, lengths)
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps,
                          padding_mask=padding_mask, lengths=lengths)


class AddNorm(nn.Module):
    r"""The Transformer's "Add & Norm" as one op: ``norm(x + residual)``.

    .. math::
        s = x + r, \qquad y = \mathrm{norm}(s) \quad (\text{LayerNorm or RMSNorm})

    Parameters are named as in :class:`torch.nn.LayerNorm` (``weight``,
    ``bias``), so a LayerNorm/RMSNorm state_dict loads into it.

    Args:
        normalized_shape: int or sequence, the trailing dimensions to normalize.
        eps: Default: 1e-5 for ``"layer"``, ``torch.finfo(x.dtype).eps`` for ``"rms"``.
        elementwise_affine: learnable ``γ`` (and ``β``). Default: True.
        bias: whether ``β`` exists. Default: True for ``"layer"``; ``"rms"`` has none.
        norm: ``"layer"`` or ``"rms"``. Default: ``"layer"``.
        prenorm: return ``(y, s)`` instead of ``y`` (pre-norm Transformers
            carry ``s`` on as the residual stream). Default: False.
        offset, casting: for ``"rms"``, as in :class:`RMSNorm` (a zero-centred
            ``γ``; where a 16-bit input is rounded). Default: 0.0, ``"float32"``.

    Shape:
        - Input, residual: ``(*, *normalized_shape)``
        - Output: same as input (a pair when ``prenorm``); ``y`` is 0 at padding

    Example::

        >>> add_norm = AddNorm(2, eps=0.0)
        >>> add_norm(torch.tensor([[0., 1.]]), torch.tensor([[1., 1.]])).detach()
        tensor([[-1.,  1.]])
    """

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 bias: Optional[bool] = None, device=None, dtype=None, *, norm: str = "layer",
                 prenorm: bool = False, offset: float = 0.0, casting: str = "float32") -> None:
        super().__init__()
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        self.offset = check_offset_casting(offset, casting, elementwise_affine)
        self.casting = casting
        if norm == "layer" and (self.offset or casting != "float32"):
            raise ValueError("offset and casting are RMSNorm's (norm='rms'); norm='layer' takes neither")
        if norm == "rms" and bias:
            raise ValueError("norm='rms' has no bias; pass bias=None or False")
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        self.norm = norm
        self.prenorm = prenorm
        self.eps = 1e-5 if (eps is None and norm == "layer") else eps
        self.elementwise_affine = elementwise_affine
        factory = dict(device=device, dtype=dtype)
        has_bias = norm == "layer" and (bias is None or bias)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.full(self.normalized_shape, 1.0 - self.offset, **factory))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if has_bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    offset = 0.0          # (modules pickled before the language models' variants existed)
    casting = "float32"

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - self.offset)     # offset + γ starts at 1
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"norm={self.norm!r}, prenorm={self.prenorm}" + variant_repr(self.offset, self.casting))

    def forward(self, input: Tensor, residual: Tensor, padding_mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None):
        if self.offset or self.casting != "float32":    # the language models' variants: the functional call
            padding_mask, lengths = padding_for_rows(input, len(self.normalized_shape), padding_mask, lengths)
            return F.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps,
                                  prenorm=self.prenorm, padding_mask=padding_mask, lengths=lengths,
                                  offset=self.offset, casting=self.casting)
        if type(self) is AddNorm:     # the lean path (see above)
            params = self._parameters
            out = F.lean_rowwise(input, self.normalized_shape, params.get("weight", _MISSING),
                                 params.get("bias", _MISSING), self.eps, padding_mask, lengths, self.norm == "layer",
                                 residual, self.prenorm, context=True)
            if out is not None:
                return out if self.prenorm else out[0]
        padding_mask, lengths = padding_for_rows(input, len(self.normalized_shape), padding_mask, lengths)
        kw = dict(prenorm=self.prenorm, padding_mask=padding_mask, lengths=lengths)
        if self.norm == "layer":
            return F.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias,
                                    self.eps, **kw)
        return F.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps, **kw)


class FeaturewiseNorm(nn.Module):
    """Shared plumbing of the batch-statistic norms (:class:`SeqBatchNorm`,
    :class:`PowerNorm` and their Sync variants): parameters, the
    ``num_batches_tracked`` counter, ``batch_first``, and :meth:`stats_reduce`,
    the hook through which a Sync variant combines statistics across processes."""

    _version = 2
    channels_first = False   # modules pickled before the option existed

    def __init__(self, num_features: int, eps: float, momentum: Optional[float], affine: bool,
                 bias: bool, batch_first: bool, factory: dict, channels_first: bool = False) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 0:
            raise ValueError(f"num_features must be a non-negative int, got {num_features!r}")
        if channels_first and not batch_first:
            raise ValueError("channels_first=True is torch.nn.BatchNorm1d's (N, C, L): it needs batch_first=True")
        check_momentum(momentum)
        self.channels_first = channels_first
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.batch_first = batch_first
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _register_counter(self, device) -> None:
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def stats_reduce(self):
        """How this module's batch statistics become the whole batch's: None
        (this process holds the whole batch); the Sync variants return their
        collectives while training in a process group."""
        return None

    def _to_batch_first(self, input: Tensor) -> Tensor:
        """The input as ``(B, T, D)`` (or ``(N, D)``); the padding mask is ``(B, T)`` in every layout.
        A nested jagged input is always ``(B, j, D)``."""
        nested = isinstance(input, torch.Tensor) and input.is_nested
        check_num_features(input, self.num_features, type(self).__name__, self.channels_first and not nested)
        return self._swap_layout(input)

    def _swap_layout(self, t: Tensor) -> Tensor:
        """``(T, B, D)`` ↔ ``(B, T, D)``, or ``(N, C, L)`` ↔ ``(N, L, C)``: each its own inverse."""
        if t.is_nested:
            return t
        if t.dim() == 3 and self.channels_first:
            return t.transpose(1, 2)
        if t.dim() == 3 and not self.batch_first:
            return t.transpose(0, 1)
        return t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Old BatchNorm checkpoints (version < 2) have no num_batches_tracked: start it at 0,
        # as torch does.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and getattr(self, "num_batches_tracked", None) is not None \
                and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
                + ("" if self.batch_first else ", batch_first=False")
                + (", channels_first=True" if self.channels_first else ""))


class SeqBatchNorm(FeaturewiseNorm):
    r"""Padding-aware BatchNorm for ``(B, T, D)`` token sequences.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Each of the ``D`` features is normalized with its mean and biased variance
    over every *real* token in the batch — the note's column statistics, pooled
    across sentences, but with padding excluded. Running statistics (unbiased
    variance, as torch) are updated from real tokens only; a batch with no real
    token returns zeros and changes nothing. In eval mode the running
    statistics are used, so outputs no longer depend on the batch.

    Arguments, parameters and buffers (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``) are those of
    :class:`torch.nn.BatchNorm1d`, so state_dicts load both ways. A 3-D input is
    ``(B, T, D)`` (features last); with ``channels_first=True`` it is
    BatchNorm1d's own ``(N, C, L)`` — the layout of a conv stack, where
    ``seqnorm.convert`` puts it in place of a BatchNorm1d.

    Args:
        num_features: ``D``.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of each new batch in the running statistics, or None
            for a cumulative average. Default: 0.1.
        affine: learnable ``γ`` (ones) and ``β`` (zeros). Default: True.
        track_running_stats: keep running statistics; if False, batch
            statistics are used in eval mode too. Default: True.
        bias: with ``affine``, whether ``β`` exists. Default: True.
        batch_first: input is ``(B, T, D)``; if False, ``(T, B, D)``. The
            padding mask is ``(B, T)`` either way, as torch.nn.Transformer's
            ``src_key_padding_mask``. Default: True.
        channels_first: input is ``(N, C, L)`` as torch.nn.BatchNorm1d's,
            with ``C = num_features``; the padding mask is ``(N, L)``. Default: False.

    Shape:
        - Input: ``(B, T, D)`` (or ``(T, B, D)``, or ``(N, C, L)``) or ``(N, D)``
        - padding_mask: ``(B, T)`` (``(N, L)``; ``(N,)`` for 2-D input); lengths: ``(B,)``
        - Output: same as input; exactly 0 at padding

    Example::

        >>> bn = SeqBatchNorm(2, eps=0.0)
        >>> x = torch.tensor([[[1., 2.], [3., 4.], [0., 0.]]])
        >>> bn(x, lengths=torch.tensor([2]))        # the pad does not shift μ = (2, 3)
        tensor([[[-1., -1.],
                 [ 1.,  1.],
                 [ 0.,  0.]]], grad_fn=<ViewBackward0>)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, batch_first: bool = True, channels_first: bool = False) -> None:
        factory = dict(device=device, dtype=dtype)
        super().__init__(num_features, eps, momentum, affine, bias, batch_first, factory, channels_first)
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self._register_counter(device)
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", track_running_stats={self.track_running_stats}"

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        if type(self) is SeqBatchNorm and self.track_running_stats and self.batch_first \
                and not self.channels_first:   # the lean path (see above)
            params, buffers = self._parameters, self._buffers
            training = self.training
            y = F.lean_seq_batch_norm(input, buffers.get("running_mean"), buffers.get("running_var"),
                                      params.get("weight", _MISSING), params.get("bias", _MISSING), training,
                                      self.momentum if training else 0.0, self.eps, padding_mask, lengths,
                                      buffers.get("num_batches_tracked", _MISSING) if training else None, True)
            if y is not None:
                return y
        x = self._to_batch_first(input)
        padding_mask, lengths = padding_for_features(x, padding_mask, lengths)
        # As torch: batch statistics in training, or when no running statistics exist.
        use_running = not self.training or self.track_running_stats
        y = F.seq_batch_norm(
            x,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight, self.bias,
            training=self.training or self.running_mean is None,
            momentum=self.momentum if self.training and self.track_running_stats else 0.0,
            eps=self.eps, padding_mask=padding_mask, lengths=lengths,
            num_batches_tracked=self.num_batches_tracked if self.training else None,
            reduce=self.stats_reduce(),
        )
        return self._swap_layout(y)


class PowerNorm(FeaturewiseNorm):
    r"""Power normalization (Shen et al., ICML 2020), exactly masked.

    .. math::
        y = \gamma \frac{x}{\sqrt{\psi^2 + \epsilon}} + \beta

    ``ψ²`` is a *running* quadratic mean per feature (no mean subtraction),
    used in training as well as in eval: each training batch is normalized by
    the ψ² of the batches before it, then ψ² moves towards the batch's
    quadratic mean of real tokens. The backward is the paper's approximate
    backpropagation, whose running statistic ν (``running_nu``) is updated in
    the backward pass. See :func:`seqnorm.functional.power_norm` for the maths.

    Buffers: ``running_phi`` (ψ², init ones), ``running_nu`` (ν, init zeros),
    ``num_batches_tracked``. Parameters as :class:`SeqBatchNorm`.

    Args:
        num_features: ``D``.
        eps: added to ψ². Default: 1e-5.
        momentum: ``1 − α`` of the paper, or None for a cumulative average.
            Default: 0.1 (α = 0.9).
        affine: learnable ``γ`` and ``β``. Default: True.
        bias: with ``affine``, whether ``β`` exists. Default: True.
        batch_first: ``(B, T, D)`` input; if False, ``(T, B, D)``. Default: True.
        channels_first: ``(N, C, L)`` input, as :class:`SeqBatchNorm`'s. Default: False.

    Shape:
        - Input: ``(B, T, D)`` (or ``(T, B, D)``) or ``(N, D)``
        - padding_mask: ``(B, T)``; lengths: ``(B,)``
        - Output: same as input; exactly 0 at padding

    Example::

        >>> pn = PowerNorm(2).eval()
        >>> pn(torch.tensor([[[1., -1.]]]))
        tensor([[[ 1.0000, -1.0000]]], grad_fn=<ViewBackward0>)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, device=None, dtype=None, *, bias: bool = True,
                 batch_first: bool = True, channels_first: bool = False) -> None:
        factory = dict(device=device, dtype=dtype)
        super().__init__(num_features, eps, momentum, affine, bias, batch_first, factory, channels_first)
        self.register_buffer("running_phi", torch.ones(num_features, **factory))
        self.register_buffer("running_nu", torch.zeros(num_features, **factory))
        self._register_counter(device)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_phi.fill_(1)
        self.running_nu.zero_()
        self.num_batches_tracked.zero_()

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        if type(self) is PowerNorm and self.batch_first and not self.channels_first:   # the lean path (see above)
            params, buffers = self._parameters, self._buffers
            training = self.training
            y = F.lean_power_norm(input, buffers.get("running_phi"), buffers.get("running_nu", _MISSING),
                                  params.get("weight", _MISSING), params.get("bias", _MISSING), training,
                                  self.momentum if training else 0.0, self.eps, padding_mask, lengths,
                                  buffers.get("num_batches_tracked", _MISSING) if training else None, True)
            if y is not None:
                return y
        x = self._to_batch_first(input)
        padding_mask, lengths = padding_for_features(x, padding_mask, lengths)
        y = F.power_norm(
            x, self.running_phi, self.running_nu, self.weight, self.bias,
            training=self.training, momentum=self.momentum if self.training else 0.0,
            eps=self.eps, padding_mask=padding_mask, lengths=lengths,
            num_batches_tracked=self.num_batches_tracked if self.training else None,
            reduce=self.stats_reduce(),
        )
        return self._swap_layout(y)


def _channels_first(input: Tensor, channels_last: bool) -> Tensor:
    """``(N, L, C)`` ↔ ``(N, C, L)`` for a channels-last module (its own inverse); a
    nested jagged ``(B, j, C)`` stays as it is (the functional ops take it channels last)."""
    if input.is_nested:
        return input
    return input.transpose(1, 2) if channels_last and input.dim() == 3 else input


class GroupNorm(nn.GroupNorm):
    r"""Padding-aware :class:`torch.nn.GroupNorm` for channels-first sequences
    (a subclass: same arguments, parameters, state_dict and ``isinstance``).

    .. math::
        y_{bct} = \frac{x_{bct} - \mathrm{E}_{bg}[x]}{\sqrt{\mathrm{Var}_{bg}[x] + \epsilon}}\,\gamma_c + \beta_c

    Each sequence's group of ``C/num_groups`` channels is normalized over its
    *real* time steps only, so an utterance gives the same output alone as
    batched with longer ones (torch's GroupNorm pools the padding into
    ``E``/``Var``). See :func:`seqnorm.functional.group_norm`.

    Args:
        num_groups: groups of channels; must divide ``num_channels``.
        num_channels: ``C``.
        eps: added to the variance. Default: 1e-5.
        affine: learnable per-channel ``γ`` (ones) and ``β`` (zeros). Default: True.
        channels_last: input is ``(N, L, C)`` instead of ``(N, C, L)``. Default: False.

    Shape:
        - Input: ``(N, C, *)``; ``(N, C, L)`` with padding (``(N, L, C)`` with
          ``channels_last``); padding_mask ``(N, L)``, lengths ``(N,)``
        - Output: same as input; exactly 0 at padding

    Example::

        >>> gn = GroupNorm(1, 2, eps=0.0)
        >>> x = torch.tensor([[[1., 3., 100.], [2., 4., -100.]]])
        >>> gn(x, lengths=torch.tensor([2]))
        tensor([[[-1.3416,  0.4472,  0.0000],
                 [-0.4472,  1.3416,  0.0000]]], grad_fn=<ViewBackward0>)
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, channels_last: bool = False) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.channels_last = channels_last

    def extra_repr(self) -> str:
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "")

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        if type(self) is GroupNorm and not self.channels_last:   # the lean path (see above)
            params = self._parameters
            y = F.lean_groupwise(input, self.num_groups, params.get("weight", _MISSING), params.get("bias", _MISSING),
                                 self.eps, padding_mask, lengths, True, self.num_channels)
            if y is not None:
                return y
        x = _channels_first(input, self.channels_last)
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-1 if x.is_nested else 1] != self.num_channels:
            raise ValueError(f"GroupNorm(num_groups={self.num_groups}, num_channels={self.num_channels}) "
                             f"expects {self.num_channels} channels, got input of shape {tuple(input.shape)}"
                             + (" (channels last)" if self.channels_last else ""))
        padding_mask, lengths = padding_for_channels_first(x, padding_mask, lengths)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                         padding_mask=padding_mask, lengths=lengths)
        return _channels_first(y, self.channels_last)


class InstanceNorm1d(nn.InstanceNorm1d):
    r"""Padding-aware :class:`torch.nn.InstanceNorm1d` (a subclass: same
    arguments, parameters, buffers and state_dict).

    .. math::
        y_{bct} = \frac{x_{bct} - \mathrm{E}_{bc}[x]}{\sqrt{\mathrm{Var}_{bc}[x] + \epsilon}}\,\gamma_c + \beta_c

    Each channel of each sequence is normalized over the sequence's real time
    steps. With ``track_running_stats`` the running statistics move as torch's
    (towards the batch average of the instances' mean and unbiased variance,
    real steps only; see :func:`seqnorm.functional.instance_norm`) and are used
    in eval mode. As torch's, ``momentum=None`` leaves them unchanged and
    ``num_batches_tracked`` is not counted.

    Args:
        num_features: ``C``.
        eps: Default: 1e-5.
        momentum: Default: 0.1.
        affine: learnable ``γ``, ``β``. Default: False (as torch).
        track_running_stats: Default: False (as torch).
        channels_last: input is ``(N, L, C)``. Default: False.

    Shape:
        - Input: ``(N, C, L)`` or ``(C, L)``; padding_mask ``(N, L)``, lengths ``(N,)``
        - Output: same as input; exactly 0 at padding

    Example::

        >>> inorm = InstanceNorm1d(1, eps=0.0)
        >>> inorm(torch.tensor([[[1., 3., 7.]]]), lengths=torch.tensor([2]))
        tensor([[[-1.,  1.,  0.]]])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None, dtype=None, *,
                 channels_last: bool = False) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.channels_last = channels_last

    def extra_repr(self) -> str:
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "")

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        momentum = self.momentum
        if type(self) is InstanceNorm1d and not self.channels_last and not self.track_running_stats \
                and (momentum is None or type(momentum) is float and 0.0 <= momentum <= 1.0):   # the lean path
            params = self._parameters
            y = F.lean_groupwise(input, self.num_features, params.get("weight", _MISSING),
                                 params.get("bias", _MISSING), self.eps, padding_mask, lengths, True,
                                 self.num_features)
            if y is not None:
                return y
        if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
            raise ValueError(f"InstanceNorm1d expects input of shape (N, C, L) or (C, L), got "
                             f"{tuple(getattr(input, 'shape', ()))}")
        unbatched = input.dim() == 2
        x = input.unsqueeze(0) if unbatched else input
        x = _channels_first(x, self.channels_last)
        if x.shape[-1 if x.is_nested else 1] != self.num_features:
            raise ValueError(f"InstanceNorm1d(num_features={self.num_features}) expects "
                             f"{self.num_features} channels, got input of shape {tuple(input.shape)}"
                             + (" (channels last)" if self.channels_last else ""))
        padding_mask, lengths = padding_for_channels_first(x, padding_mask, lengths)
        y = F.instance_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            use_input_stats=self.training or not self.track_running_stats,
            momentum=self.momentum if self.momentum is not None else 0.0, eps=self.eps,
            padding_mask=padding_mask, lengths=lengths,
        )
        y = _channels_first(y, self.channels_last)
        return y.squeeze(0) if unbatched else y
