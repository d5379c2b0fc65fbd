"""The one padding path: ``padding_mask`` or ``lengths`` → one validated bool mask.

Every norm in seqnorm takes its padding through :func:`resolve_padding`, so
every norm validates it the same way and no norm ever broadcasts a mask of the
wrong shape.

Convention: ``True`` marks **padding**, as torch.nn.Transformer's
``src_key_padding_mask`` does. ``lengths[b]`` is the number of real tokens at
the start of sequence ``b``; the rest is padding.

**No host reads.** A mask is built from lengths on the input's device
(``arange(T) >= lengths[:, None]``, two small kernels), and nothing here reads
a device tensor back to the host, which on a GPU would stall the stream. Where
lengths are checked against ``T`` depends on where they live:

* lengths given as a Python list or a CPU tensor (what a data loader makes)
  are host data: they are checked on the host, for free, with the
  ``ValueError`` below, and copied to the input's device without waiting
  (``non_blocking``);
* lengths on an accelerator — or any tensor while ``torch.compile`` traces
  (:func:`seqnorm.running.sync_free`) — are checked on the device with
  ``torch._assert_async``: a length outside ``[0, T]`` stops the stream with a
  device-side assertion (CUDA does not show the message) instead of a
  ``ValueError``. Inside :func:`padding` that check runs once per frame rate.

A ``padding_mask`` needs no value check: its dtype, shape and device are
metadata.
"""

from __future__ import annotations

import threading
import weakref
from typing import Optional, Sequence

import torch

from . import running

__all__ = ["resolve_padding", "lengths_to_padding_mask", "shape_str", "padding", "current_padding",
           "padding_for_rows", "padding_for_features", "padding_for_channels_first", "host_readable",
           "assert_on_device", "flat_padding", "open_padding", "close_padding", "push_in_flight", "pop_in_flight",
           "call_argument",
           "PaddingContext", "HostRows",
           "host_rows", "read_once", "end_padded_lengths", "lengths_mask", "host_lengths_mask",
           "host_context_mask"]

Tensor = torch.Tensor


def shape_str(shape: Sequence[int]) -> str:
    """A shape as Python writes a tuple: ``(2, 3)``, ``(3,)``, ``()``."""
    return str(tuple(int(s) for s in shape))


def host_readable(t) -> bool:
    """Whether the values of ``t`` can be read on the host without stalling a
    device: Python data, or a tensor for which :func:`seqnorm.running.sync_free`
    is False (a CPU tensor outside ``torch.compile``)."""
    return not isinstance(t, Tensor) or not running.sync_free(t)


def assert_on_device(ok: Tensor, message: str) -> None:
    """Check the 0-d bool ``ok`` where it lives, without a host read
    (``torch._assert_async``: a device-side assertion on CUDA, a RuntimeError
    with ``message`` on the CPU)."""
    torch._assert_async(ok, message)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; host data is copied without waiting for the device
    (a pageable CPU → GPU copy is staged, so the source may change right after)."""
    if t.device == device:
        return t
    return t.to(device, non_blocking=t.device.type == "cpu")


def lengths_to_padding_mask(lengths: torch.Tensor, max_len: int, device=None) -> torch.Tensor:
    """``(B,)`` lengths → ``(B, max_len)`` bool mask, True at positions ``t >= lengths[b]``.

    Built on ``device`` (default: the lengths' device). Lengths outside
    ``[0, max_len]`` are an error: a ``ValueError`` when they are host data, a
    device-side check otherwise (see the module docstring).

    Example:
        >>> lengths_to_padding_mask(torch.tensor([2, 0, 3]), 3)
        tensor([[False, False,  True],
                [ True,  True,  True],
                [False, False, False]])
    """
    given = lengths
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor of shape (B,), got dtype {lengths.dtype}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must have shape (B,), got {shape_str(lengths.shape)}")
    _check_range(given, lengths, max_len)
    device = lengths.device if device is None else torch.device(device)
    return _mask(_to_device(lengths, device), max_len)


def _mask(lengths: Tensor, max_len: int) -> Tensor:
    """The mask of validated lengths, where the lengths are."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.unsqueeze(1)


def _check_range(given, lengths: Tensor, max_len: int) -> None:
    """``0 ≤ lengths ≤ max_len``: on the host for host data (``given`` is what
    the caller passed: a Python sequence is read as Python numbers), else on the device."""
    if lengths.numel() == 0:
        return
    if not isinstance(given, Tensor):
        lo, hi = int(min(given)), int(max(given))
    elif host_readable(lengths):
        lo, hi = int(lengths.min()), int(lengths.max())
    else:
        # under torch.compile T may be a symbolic size (dynamic shapes), which tracing cannot tell
        # from an int: formatting it would fix it to the traced value, and every other T would recompile
        bound = "T" if torch.compiler.is_compiling() else max_len
        assert_on_device(((lengths >= 0) & (lengths <= max_len)).all(),
                         f"lengths must lie in [0, {bound}] (the sequence length T)")
        return
    if lo < 0 or hi > max_len:
        raise ValueError(
            f"lengths must lie in [0, {max_len}] (the sequence length T), got values in [{lo}, {hi}]"
        )


def resolve_padding(
    expected_shape: Sequence[int],
    device: torch.device,
    padding_mask: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    what: str = "(B, T)",
) -> Optional[torch.Tensor]:
    """Validate ``padding_mask`` / ``lengths`` against the token shape of the input.

    Args:
        expected_shape: the shape of the token grid, i.e. the input's shape
            without the normalized (feature) dimensions, e.g. ``(B, T)``.
        device: the input's device; the mask must live there.
        padding_mask: bool tensor of exactly ``expected_shape``, True at padding.
        lengths: integer tensor ``(B,)``; only for a 2-D token grid ``(B, T)``.
        what: how the expected shape is named in error messages.

    Returns:
        ``None`` when no padding was given, else a bool tensor of
        ``expected_shape`` on ``device``.

    Raises:
        TypeError: the mask is not a bool tensor, or lengths not integer.
        ValueError: shapes or devices do not match, lengths out of range, or
            both padding_mask and lengths were given.
    """
    if lengths is None and isinstance(padding_mask, Tensor) and padding_mask.dtype == torch.bool \
            and padding_mask.shape == expected_shape and padding_mask.device == device:
        return padding_mask        # the common case, checked without building anything (host time per call)
    expected_shape = tuple(int(s) for s in expected_shape)
    if padding_mask is not None and lengths is not None:
        raise ValueError("pass either padding_mask or lengths, not both")
    if lengths is not None:
        if len(expected_shape) != 2:
            raise ValueError(
                f"lengths describes a (B, T) token grid, but the input's token shape is "
                f"{shape_str(expected_shape)}; pass padding_mask of that shape instead"
            )
        if isinstance(lengths, torch.Tensor) and lengths.shape != (expected_shape[0],):
            raise ValueError(
                f"lengths must have shape (B,) = ({expected_shape[0]},), got {shape_str(lengths.shape)}"
            )
        return _mask_of_lengths(lengths, expected_shape, device)
    if padding_mask is None:
        return None
    if not isinstance(padding_mask, torch.Tensor):
        raise TypeError(
            f"padding_mask must be a bool torch.Tensor of shape {what} = {shape_str(expected_shape)}, "
            f"got {type(padding_mask).__name__}"
        )
    if padding_mask.dtype != torch.bool:
        raise TypeError(
            f"padding_mask must have dtype torch.bool (True = padding) and shape {what} = "
            f"{shape_str(expected_shape)}, got dtype {padding_mask.dtype}"
        )
    if tuple(padding_mask.shape) != expected_shape:
        raise ValueError(
            f"padding_mask must have shape {what} = {shape_str(expected_shape)} "
            f"(one entry per token), got {shape_str(padding_mask.shape)}"
        )
    if padding_mask.device != torch.device(device):
        raise ValueError(
            f"padding_mask is on {padding_mask.device} but the input is on {device}"
        )
    return padding_mask


def _mask_of_lengths(lengths, expected_shape, device) -> Tensor:
    """The validated mask of ``lengths``; the last lengths tensor's mask is kept, so that
    the same lengths given to a model's many norms are checked and turned into a mask once
    (a norm never changes its mask in place)."""
    global _last_lengths
    key = (expected_shape[1], device)
    memo = isinstance(lengths, Tensor) and not torch.compiler.is_compiling() and _cacheable(lengths)
    if memo:
        ref, version, last_key, mask = _last_lengths
        if ref() is lengths and version == lengths._version and last_key == key:
            return mask
    mask = lengths_to_padding_mask(lengths, expected_shape[1], device)
    if mask.shape[0] != expected_shape[0]:
        raise ValueError(
            f"lengths must have shape (B,) = ({expected_shape[0]},), got {shape_str(mask.shape[:1])}"
        )
    if memo:
        _last_lengths = (weakref.ref(lengths), lengths._version, key, mask)
    return mask


def flat_padding(mask: Optional[Tensor], rows: int) -> Optional[Tensor]:
    """A validated mask as the ``(rows,)`` row mask a backend takes — the *same*
    tensor for the same mask, call after call (the last mask's is kept, as long
    as it is not changed in place), so that what a backend derives from it (the
    torch backend's padded-row indices) is derived once for a model's many norms."""
    global _last_flat
    if mask is None:
        return None
    if torch.compiler.is_compiling():
        return mask.reshape(rows)
    ref, version, flat = _last_flat
    if ref() is mask and version == mask._version and flat.shape[0] == rows:
        return flat
    flat = mask.reshape(rows)
    if _cacheable(mask):
        _last_flat = (weakref.ref(mask), mask._version, flat)
    return flat


def _dead():
    return None


def _cacheable(t: Tensor) -> bool:
    """Whether derived values of ``t`` may be kept, keyed on the object and its version
    counter: an inference tensor has no version counter (an in-place change could not be seen)."""
    return not t.is_inference()


# (weak reference to the last mask flat_padding saw, its version counter, its (rows,) view);
# the view keeps that one mask alive
_last_flat = (_dead, -1, None)
# (weak reference to the last lengths tensor resolved, its version counter, (T, device), its mask)
_last_lengths = (_dead, -1, None, None)


# ---------------------------------------------------------------------------
# The CPU fast paths' view of a mask (issue 16: host time per module call)
# ---------------------------------------------------------------------------


class HostRows:
    """What the CPU fast paths (:mod:`seqnorm.functional`) use of one validated
    bool mask, read on the host once per mask: the indices of its padded and of
    its real entries in the flattened mask, and how many there are.

    Kept by :func:`host_rows` for the last few masks (:func:`read_once`), so a
    model's many norms given one mask read it once, and a mask changed in place,
    or another mask of the same shape, is read again."""

    __slots__ = ("shape", "col", "padded", "_flat", "_real", "n_pad", "n_real")

    def __init__(self, mask: Tensor):
        flat = mask.reshape(-1)
        self.shape = mask.shape
        self.col = mask.unsqueeze(-1)        # broadcasts over a (*, D) input's last dimension
        self.padded = flat.nonzero().squeeze(1)
        self.n_pad = self.padded.shape[0]
        self.n_real = flat.shape[0] - self.n_pad
        self._flat, self._real = flat, None

    @property
    def real(self) -> Tensor:
        """The real entries' indices, read when first asked for: only a feature-wise norm's
        statistics gather them (a row-wise norm fills the padded rows alone)."""
        if self._real is None:
            self._real = torch.logical_not(self._flat).nonzero().squeeze(1)
        return self._real


#: the last masks :func:`host_rows` read, newest first
_host_rows = []
_HOST_ROWS_KEPT = 4


def read_once(kept: list, t: Tensor, make, keep: int = 4):
    """``make(t)``, kept in ``kept`` (newest first, at most ``keep`` entries) for the tensor
    object ``t`` — a weak reference: a dead tensor's entry never matches — and its version
    counter: any in-place change of ``t``, or of a tensor it is a view of, moves it, so a
    changed or another tensor is read again (an inference tensor, which has no version
    counter, every time)."""
    for ref, version, value in kept:
        if ref() is t and version == t._version:
            return value
    value = make(t)
    if _cacheable(t):
        kept.insert(0, (weakref.ref(t), t._version, value))
        del kept[keep:]
    return value


def host_rows(mask: Tensor) -> HostRows:
    """The :class:`HostRows` of a bool mask on the CPU, outside ``torch.compile`` (the
    caller has checked both: reading it back is free there), read once per mask object
    and version (:func:`read_once`)."""
    return read_once(_host_rows, mask, HostRows, _HOST_ROWS_KEPT)


def end_padded_lengths(mask: Tensor) -> Optional[Tensor]:
    """The lengths ``L_b`` of a host ``(B, T)`` padding mask (True at padding) that pads
    each sequence at its end only (``mask[b, t] = t ≥ L_b``), or None where one has
    padding between real steps."""
    lengths = torch.logical_not(mask).sum(1)
    return lengths if torch.equal(_mask(lengths, mask.shape[1]), mask) else None


def lengths_mask(lengths, steps: int, device) -> Optional[Tensor]:
    """The validated mask :func:`resolve_padding` last made of the ``lengths`` tensor,
    for ``steps`` time steps on ``device``, if that is what ``lengths`` is (the same
    object, unchanged in place); else None (the caller takes the general path, which
    makes it)."""
    ref, version, key, mask = _last_lengths
    if ref() is lengths and version == lengths._version and key[0] == steps and key[1] == device:
        return mask
    return None


def host_lengths_mask(lengths, steps: int) -> Optional[Tensor]:
    """:func:`lengths_mask` on the CPU."""
    return lengths_mask(lengths, steps, _CPU)


_CPU = torch.device("cpu")


def host_context_mask(token_shape, rows: bool) -> Optional[Tensor]:
    """The CPU mask of the :func:`padding` context for a token grid ``(a, b)``, as a
    row-wise norm (``rows``: laid out as :meth:`PaddingContext.for_tokens`) or a
    feature-wise one (:meth:`PaddingContext.batch_major`) receives it: the one last
    handed out, else made now; None where the context cannot make it (the caller takes
    the general path, which raises the context's error)."""
    ctx = current_padding()
    if ctx is None:
        return None
    last = ctx._host_rows if rows else ctx._host_major
    if last is not None and last[0] == token_shape:
        return last[1]
    try:      # the first norm at a rate: the mask the general path would get, without going there
        return ctx.for_tokens(token_shape, _CPU) if rows else ctx.batch_major(token_shape, _CPU)
    except (ValueError, TypeError):
        return None


# ---------------------------------------------------------------------------
# Padding for norms you do not call yourself: ``with seqnorm.padding(mask): model(x)``
# ---------------------------------------------------------------------------


class ByRate:
    """A small map whose keys are numbers of time steps (or tuples of them), found by
    ``==`` rather than by hashing. Under ``torch.compile`` with dynamic shapes a
    number of steps is symbolic: hashing it (a dict key, ``int()``) would fix it to
    the value traced, and every other length would compile again; ``==`` between
    two sizes is a relation the compiled graph keeps. A model has a handful of
    rates, so a list is as fast as a dict here."""

    __slots__ = ("items",)

    def __init__(self):
        self.items: list = []

    def get(self, key, default=None):
        for k, v in self.items:
            if k == key:
                return v
        return default

    def set(self, key, value) -> None:
        self.drop(lambda k: k == key)
        self.items.append((key, value))

    def drop(self, which) -> None:
        """Remove the entries whose key ``which(key)`` holds for."""
        self.items = [(k, v) for k, v in self.items if not which(k)]

    def keys(self) -> list:
        return [k for k, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)


class _RateLengths:
    """The lengths at one rate: a ``(B,)`` tensor, the same values as a tuple of Python
    ints (host data only), or both — each made from the other when first asked for."""

    __slots__ = ("tensor", "host")

    def __init__(self, tensor: Optional[Tensor], host: Optional[tuple] = None):
        self.tensor, self.host = tensor, host


class PaddingContext:
    """The padding set by :func:`padding`, handed to every seqnorm module that
    is called without an explicit ``padding_mask`` / ``lengths``.

    **Frame rates.** A model may change the number of time steps on the way
    (a strided convolution turns 16,000 samples into 49 frames). The context
    keeps the sequence lengths at each number of time steps it has seen: the
    given ``padding_mask`` holds for its own ``T``; given ``lengths`` hold for
    the ``T`` of the first module that asks for them; and
    :func:`seqnorm.make_padding_safe`'s convolution hooks :meth:`record` the
    lengths at each convolution's output (the latest record for a ``T`` holds).
    A module whose ``T`` has no lengths gets a ``ValueError`` saying which rates
    are known.

    **One mask per rate.** The ``(B, T)`` mask at a rate is built (on the
    device, from the lengths) and validated once, when the first module at
    that rate asks for it; every later module at that rate gets the same
    tensor, until a layer records new lengths for that ``T``.
    """

    _WHAT = "(B, T) [from seqnorm.padding]"

    def __init__(self, padding_mask, lengths, batch_first: bool, *, real_mask=None):
        self._padding_mask, self._real_mask = padding_mask, real_mask
        self.lengths, self.batch_first = lengths, batch_first
        self._lengths_at = ByRate()      # time steps → _RateLengths: the (B,) lengths at that rate
        # (B, T, device) → the validated (B, T) mask; (what, T, device) → a tensor at_rate made
        self._masks = ByRate()
        # (token shape, mask) last handed out on the CPU by batch_major / for_tokens (host_context_mask)
        self._host_major = self._host_rows = None

    @property
    def padding_mask(self):
        """The given ``(B, T)`` mask, True at padding; from ``real_mask`` (1 at real steps, as
        a model is called with) on first use, so that a hook that opens a context from a
        model's mask computes nothing itself (under ``torch.compile`` it then adds no graph
        of its own: the negation is traced into the model's)."""
        if self._padding_mask is None and self._real_mask is not None:
            self._padding_mask = self._real_mask.logical_not()
        return self._padding_mask

    def batch_major(self, token_shape: Sequence[int], device) -> torch.Tensor:
        """The validated ``(B, T)`` mask on ``device``; ``token_shape`` is ``(B, T)``."""
        key = (token_shape[0], token_shape[1], device)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._resolve(key[:2], device)
            self._masks.set(key, mask)
        if mask.is_cpu and not torch.compiler.is_compiling():
            self._host_major = ((int(key[0]), int(key[1])), mask)
        return mask

    def _resolve(self, token_shape, device) -> torch.Tensor:
        mask = self.padding_mask
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2
                                 or mask.shape[1] == token_shape[1] or not self._lengths_at):
            return resolve_padding(token_shape, device, mask, None, what=self._WHAT)
        host = self.host_lengths_at(token_shape[1])
        if host is not None and len(host) == token_shape[0]:     # range-checked in Python, no tensor read
            return lengths_to_padding_mask(host, token_shape[1], device)
        return resolve_padding(token_shape, device, None, self.lengths_at(token_shape[1]), what=self._WHAT)

    def mask_at(self, steps: int, device) -> torch.Tensor:
        """The ``(B, steps)`` mask on ``device`` (``B`` from the lengths at ``steps``),
        the one :meth:`batch_major` hands every module at that rate."""
        host = self.host_lengths_at(steps)
        if host is not None:
            return self.batch_major((len(host), steps), device)
        lengths = self.lengths_at(steps)
        return self.batch_major((lengths.shape[0] if lengths.dim() else 0, steps), device)

    def lengths_at(self, steps: int) -> torch.Tensor:
        """The ``(B,)`` lengths at a module with ``steps`` time steps (see the class docstring)."""
        entry = self._lengths_at.get(steps)
        if entry is not None:
            if entry.tensor is None:      # recorded as Python ints: the tensor is made when a module asks
                entry.tensor = torch.tensor(entry.host, dtype=torch.long)
            return entry.tensor
        if self.padding_mask is None and not self._lengths_at:
            lengths = torch.as_tensor(self.lengths)     # the first module sets the input's rate
            self._lengths_at.set(steps, _RateLengths(lengths))
            return lengths
        if self.padding_mask is not None and not self._lengths_at:
            mask = self.padding_mask
            if mask.dim() == 2 and mask.shape[1] == steps:
                return self.mask_lengths()
        known = self.known_steps() or [int(self.padding_mask.shape[-1])]
        raise ValueError(
            f"seqnorm.padding: no sequence lengths are known at {steps} time steps (known at "
            f"{', '.join(map(str, known))}); a layer changed the number of steps in a way seqnorm does not "
            f"follow — seqnorm.make_padding_safe(model) carries lengths through Conv1d and pooling layers"
        )

    def mask_lengths(self) -> torch.Tensor:
        """The lengths of the given ``padding_mask``, which must have its padding at the end
        of each sequence (a rate change needs lengths): checked on the host for a
        host mask, on the device otherwise (see the module docstring)."""
        mask = self.padding_mask
        lengths = (~mask).sum(1)
        rebuilt = _mask(lengths, mask.shape[1])
        holes = ("seqnorm.padding: a layer changes the number of time steps, which needs the padding at the "
                 "end of each sequence; this padding_mask has padding between real steps — pass lengths")
        if not host_readable(mask):
            assert_on_device(torch.eq(rebuilt, mask).all(), holes)
        elif not torch.equal(rebuilt, mask):
            raise ValueError(holes)
        self._lengths_at.set(mask.shape[1], _RateLengths(lengths))
        return lengths

    def host_lengths_at(self, steps: int) -> Optional[tuple]:
        """The lengths at ``steps`` time steps as a tuple of Python ints, where they are
        host data (a CPU tensor or Python numbers, outside ``torch.compile``; read once
        per rate), so that a hook checks them and carries them through a layer in Python
        rather than in several tiny tensor ops; None where they are not, or where no
        lengths are known at ``steps`` yet (:meth:`lengths_at` says why)."""
        if torch.compiler.is_compiling():
            return None
        entry = self._lengths_at.get(steps)
        if entry is None:
            return None
        if entry.host is None:
            t = entry.tensor
            if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool \
                    or not host_readable(t):      # on a device: never read back (see the module docstring)
                return None
            entry.host = tuple(t.tolist())
        return entry.host

    def host_mask_at(self, steps: int, device) -> Optional[torch.Tensor]:
        """:meth:`mask_at` where it is the mask of the host lengths at ``steps``
        (:meth:`host_lengths_at`: ``arange(steps) >= L``), so that what else is made of
        those lengths can be made of it; None where they are not host data, or where the
        given ``padding_mask`` is at ``steps`` (that rate's mask is the one given)."""
        host = self.host_lengths_at(steps)
        if host is None:
            return None
        given = self.padding_mask
        if given is not None and not (isinstance(given, Tensor) and given.dim() == 2 and given.shape[1] != steps):
            return None
        return self.batch_major((len(host), steps), device)

    def at_rate(self, what: str, steps: int, device, make) -> torch.Tensor:
        """A tensor derived from the lengths at ``steps`` for ``device`` (``what`` names
        it: an attention module's key mask), ``make()`` when first asked for, then the
        same tensor until a layer records new lengths at ``steps`` — kept as the rate's
        mask is (:meth:`batch_major`), so a kept context's next call makes none."""
        key = (what, steps, device)      # key[1] is the rate: record() drops it with the rate's masks
        value = self._masks.get(key)
        if value is None:
            value = make()
            self._masks.set(key, value)
        return value

    def record(self, steps: int, lengths) -> None:
        """Record the lengths at ``steps`` time steps (a rate-changing layer's output): a
        ``(B,)`` tensor, or a tuple of Python ints (host data, :meth:`host_lengths_at`).
        Two rates with the same number of steps (a pooling layer and, later, an
        upsampling one) cannot be told apart by the number: the latest record holds,
        which in a feed-forward stack is the layer that made the tensor at hand."""
        entry = self._lengths_at.get(steps)
        if entry is not None and (entry.tensor is lengths or entry.host is lengths      # a layer that keeps them
                                  or (type(lengths) is tuple and entry.host == lengths)):
            return      # (host ints equal to those known, as a kept context's next call records: the masks stay)
        self._lengths_at.set(steps, _RateLengths(None, lengths) if isinstance(lengths, tuple)
                             else _RateLengths(lengths))
        self._masks.drop(lambda key: key[1] == steps)
        self._host_major = self._host_rows = None

    def known_steps(self):
        """The numbers of time steps whose lengths are known (a sorted list; under
        ``torch.compile``, in the order they became known)."""
        steps = self._lengths_at.keys()
        return steps if torch.compiler.is_compiling() else sorted(int(k) for k in steps)

    def _for_heads(self, token_shape: tuple, device) -> torch.Tensor:
        rates = known_rates(self)
        axes = [i for i in range(1, len(token_shape)) if token_shape[i] in rates]
        if len(axes) != 1:
            mask = torch.zeros(token_shape, dtype=torch.bool, device=device)
        else:
            shape = [1] * len(token_shape)
            shape[0], shape[axes[0]] = token_shape[0], token_shape[axes[0]]
            mask = self.for_tokens((token_shape[0], token_shape[axes[0]]), device)
            mask = mask.reshape(shape).expand(token_shape).contiguous()
        if mask.is_cpu and not torch.compiler.is_compiling():
            self._host_rows = (tuple(int(s) for s in token_shape), mask)
        return mask

    def for_tokens(self, token_shape: Sequence[int], device) -> torch.Tensor:
        """The mask laid out as a row-wise norm's token grid: ``(B, T)`` when
        ``batch_first``, ``(T, B)`` otherwise.

        A per-head input (a language model's ``q_norm`` / ``k_norm``: ``(B, T, H, D)``, or
        ``(B, H, T, D)`` after the transpose) gets its token's bit on each of its heads, the
        time axis being the one axis after ``B`` whose size is a known number of steps. Where
        none or several are (``H == T``), no padding: a row-wise norm's real tokens do not depend
        on the mask, so guessing wrong would be the only harm (a padded token is then left as
        computed, not zeroed)."""
        if len(token_shape) > 2 and self.batch_first:
            return self._for_heads(tuple(token_shape), device)
        if len(token_shape) != 2:
            raise ValueError(f"seqnorm.padding gives a (B, T) mask, but this norm's input has token shape "
                             f"{shape_str(token_shape)}; pass padding_mask to it directly")
        if self.batch_first:
            mask = self.batch_major(token_shape, device)
        else:
            mask = self.batch_major((token_shape[1], token_shape[0]), device).transpose(0, 1)
        if mask.is_cpu and not torch.compiler.is_compiling():
            self._host_rows = (tuple(int(s) for s in token_shape), mask)
        return mask


def padding(padding_mask: Optional[torch.Tensor] = None, *, lengths: Optional[torch.Tensor] = None,
            batch_first: bool = True):
    """Context manager: every seqnorm module called inside it, without its own
    ``padding_mask``/``lengths``, uses this padding.

    This is how padding reaches the norms of a model you did not write (for
    example after :func:`seqnorm.convert`; a model given to
    :func:`seqnorm.make_padding_safe` opens it itself from the mask it is called
    with, :mod:`seqnorm.call_padding`, and a context opened here wins)::

        with seqnorm.padding(src_key_padding_mask, batch_first=False):
            out = encoder(src, src_key_padding_mask=src_key_padding_mask)

    Args:
        padding_mask: bool ``(B, T)``, True at padding (torch.nn.Transformer's
            ``src_key_padding_mask``).
        lengths: ``(B,)`` integers, instead of ``padding_mask``.
        batch_first: whether the model's activations are ``(B, T, D)``; for
            ``(T, B, D)`` activations row-wise norms receive the transposed mask.
            SeqBatchNorm/PowerNorm always take ``(B, T)`` (their own
            ``batch_first`` says how their input is laid out).
    """
    if padding_mask is None and lengths is None:
        raise ValueError("seqnorm.padding needs padding_mask or lengths")
    if padding_mask is not None and lengths is not None:
        raise ValueError("pass either padding_mask or lengths, not both")
    return _PaddingScope(PaddingContext(padding_mask, lengths, batch_first))


class _PaddingScope:
    def __init__(self, ctx: PaddingContext):
        self.ctx = ctx

    def __enter__(self) -> PaddingContext:
        self.depth = open_padding(self.ctx)
        return self.ctx

    def __exit__(self, *exc) -> None:
        close_padding(self.depth)


class _ThreadPadding(threading.local):
    """The padding contexts open in this thread, innermost last.

    Per thread, never one process global: two threads serving one model each see
    their own batch's padding. A ``threading.local`` attribute and a list (not a
    ``ContextVar``) because ``torch.compile`` traces both without a graph break, so
    a padding-safe model compiles into one graph."""

    def __init__(self):
        self.stack: list = []


_open = _ThreadPadding()


def open_padding(ctx: Optional[PaddingContext]) -> int:
    """Make ``ctx`` the current padding of this thread (``None``: no padding, for one
    layer that falls back to torch's behaviour) until :func:`close_padding` is given
    the depth this returns. :func:`padding` is the public way; this is for hooks,
    which open a context in a pre-hook and close it in a forward hook."""
    stack = _open.stack
    stack.append(ctx)
    return len(stack) - 1


def close_padding(depth: int) -> None:
    """Close the context :func:`open_padding` opened at ``depth``, and any left open
    above it (a hook whose forward raised)."""
    del _open.stack[depth:]


def known_rates(ctx: PaddingContext) -> list:
    """The numbers of steps whose lengths ``ctx`` knows (the given mask's too); a
    list compared with ``==``, never hashed (see :class:`ByRate`)."""
    known = list(ctx.known_steps())
    if ctx.padding_mask is not None and ctx.padding_mask.dim() == 2 and ctx.padding_mask.shape[1] not in known:
        known.append(ctx.padding_mask.shape[1])
    return known


class _InFlight(threading.local):
    """Per thread, the hooked calls in flight whose forward hook has something to undo
    or finish: ``(module, what, value)``, innermost last (a pre-hook pushes at most one
    entry, its module's forward hook pops it). Per thread, so two threads running one
    model never take each other's entries; a list on a ``threading.local``, which
    ``torch.compile`` traces without a graph break."""

    def __init__(self):
        self.stack: list = []


_in_flight = _InFlight()


def call_argument(args, kwargs, index: Optional[int], name: str):
    """The argument ``name`` of a hooked call, given by keyword or at position ``index``
    (None where the signature has it keyword-only); None where the call does not pass it."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if index is not None and index < len(args) else None


def push_in_flight(module, what: str, value) -> None:
    """Leave ``value`` (of kind ``what``) for ``module``'s forward hook: :func:`pop_in_flight`."""
    _in_flight.stack.append((module, what, value))


def pop_in_flight(module, what: Optional[str] = None):
    """``(what, value)`` of ``module``'s entry if it is the innermost one (and of kind
    ``what``, when given), removed; else None (its pre-hook pushed nothing)."""
    stack = _in_flight.stack
    if stack and stack[-1][0] is module and (what is None or stack[-1][1] == what):
        _, kind, value = stack.pop()
        return kind, value
    return None


def current_padding() -> Optional[PaddingContext]:
    """The innermost :func:`padding` context of this thread, or None."""
    stack = _open.stack
    return stack[-1] if stack else None


def padding_for_rows(input: torch.Tensor, k: int, padding_mask, lengths):
    """A row-wise norm's padding: explicit ``padding_mask``/``lengths`` win;
    otherwise the :func:`padding` context, laid out as the token grid
    ``input.shape[:-k]``; otherwise none. Returns ``(padding_mask, lengths)``."""
    if padding_mask is not None or lengths is not None or input.is_nested:   # a nested input has no padding
        return padding_mask, lengths
    ctx = current_padding()
    if ctx is None:
        return None, None
    return ctx.for_tokens(input.shape[: input.dim() - k], input.device), None


def padding_for_features(x: torch.Tensor, padding_mask, lengths):
    """As :func:`padding_for_rows` for the feature-wise norms, whose batch-first
    ``x`` has the token grid ``(B, T)`` (a 2-D ``(N, D)`` input takes no context)."""
    if padding_mask is not None or lengths is not None or x.dim() != 3 or x.is_nested:
        return padding_mask, lengths
    ctx = current_padding()
    if ctx is None:
        return None, None
    return ctx.batch_major(x.shape[:2], x.device), None


def padding_for_channels_first(x: torch.Tensor, padding_mask, lengths):
    """As :func:`padding_for_features` for a channels-first ``(N, C, L)`` input
    (GroupNorm, InstanceNorm1d), whose token grid is ``(N, L)``."""
    if padding_mask is not None or lengths is not None or x.dim() != 3 or x.is_nested:
        return padding_mask, lengths
    ctx = current_padding()
    if ctx is None:
        return None, None
    return ctx.batch_major((x.shape[0], x.shape[2]), x.device), None
