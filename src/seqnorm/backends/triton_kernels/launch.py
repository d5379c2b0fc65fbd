"""Launching a kernel through a handle cached per specialization (issue 27: host time per call).

``kernel[grid](*args, **constexprs)`` costs Triton 5–13 µs of host time per launch
(meta-pytorch/tritonbench#669): it reads its knobs, the current device and stream,
runs its pre-run hooks, binds every argument and specializes it (type, 16-byte
alignment, ``== 1``), hashes the specialization, checks its global variables, and
builds launch metadata — every time, though a call site launches the same few
specializations again and again. :class:`CachedKernel` does that work once per
specialization and keeps a handle for it:

* the **key** of a call is what Triton specializes on, computed by a function
  generated for the kernel from the kinds of its positional arguments at the first
  call (a tensor: its dtype and whether its data pointer is 16-byte aligned; an int:
  whether it is 1, whether it divides by 16, whether it fits 32 bits — for the common
  2 ≤ n < 2³¹ the second alone, one test fewer per int; a float or a
  bool: nothing), plus the keyword arguments (constexprs, ``num_warps``) — as the tag of
  their :class:`Specialization`, an object the call site keeps, so a launch neither
  builds nor hashes them — plus the current device when compiled. Equal keys mean equal Triton
  specializations (``tests/test_triton_launch.py`` checks the key against Triton's
  own specialization), so one handle serves every call with that key;
* the **handle**, made on a key's first call (a miss) by launching through Triton's
  own ``run`` — which compiles and returns the kernel — is, for a compiled kernel,
  its launcher bound to the loaded function and packed metadata: a later launch is
  the launcher's call (a C function) with the current stream and the arguments, as
  ``JITFunction.run`` ends. Under Triton's interpreter (``TRITON_INTERPRET=1``)
  there is nothing compiled to bind: the handle runs the interpreted kernel (the
  same lookup, a different leaf — the compiled binding runs on a GPU only).

Where Triton's launch hooks are set (a profiler: ``knobs.runtime.launch_enter_hook``),
or the arguments are not of the kinds the key function was made for, the call goes
through ``kernel[grid]`` as it is, uncached. Counts of both (``hits``, ``misses``)
are kept per kernel for the tests.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from triton import knobs

__all__ = ["CachedKernel", "Specialization", "cached_kernels"]

Tensor = torch.Tensor


def _kind(a) -> str:
    """The kind of a positional argument the key function is made for."""
    if isinstance(a, Tensor):
        return "t"
    if type(a) is int:
        return "i"
    if type(a) in (float, bool) or a is None:
        return "f" if a is not None else "n"
    return "?"


def _key_function(kinds: str, implied: frozenset = frozenset()) -> Callable:
    """``key(*args)``: a tuple that differs wherever Triton's specialization of the
    arguments (of these kinds) differs: each tensor's dtype, each int's classes, and
    ``True`` when every data pointer is 16-byte aligned (the common case, one test)
    or else each pointer's alignment. An argument of another kind raises (a tensor
    where an int was: ``&`` of a tensor is a tensor, which the miss path turns away).
    ``implied``: positions of tensors left out of the key (see :class:`Specialization`)."""
    names = [f"a{i}" for i in range(len(kinds))]
    parts, pointers = [], []
    for i, (name, kind) in enumerate(zip(names, kinds)):
        if kind == "t" and i in implied:
            continue
        if kind == "t":
            parts.append(f"{name}.dtype")
            pointers.append(f"p{len(pointers)}")
        elif kind == "i":
            # 2 ≤ n < 2³¹ (a size, a stride): whether 16 divides it is its whole class (not 1, 32-bit);
            # any other int (0, 1, negative, 64-bit): its three classes (a tuple: never equal to a bool)
            parts.append(f"{name} & 15 == 0 if 1 < {name} < 0x80000000 else "
                         f"({name} == 1, {name} & 15 == 0, -0x80000000 <= {name} < 0x80000000)")
        elif kind == "n":
            parts.append(f"{name} is None")
    body = []
    tensors = [name for i, (name, kind) in enumerate(zip(names, kinds)) if kind == "t" and i not in implied]
    if tensors:
        body.append(f"    {', '.join(pointers)}, = {', '.join(f'{t}.data_ptr()' for t in tensors)},")
        aligned = (f"({' | '.join(pointers)}) & 15 == 0 or ({', '.join(f'{p} & 15 == 0' for p in pointers)},)")
        parts.append(f"{aligned}")
    source = (f"def key({', '.join(names)}):\n" + "".join(line + "\n" for line in body)
              + f"    return ({', '.join(parts)}{',' if parts else ''})\n")
    namespace: dict = {}
    exec(source, namespace)
    return namespace["key"]


class _Compiled:
    """A compiled kernel's launch: its launcher with the loaded function, packed
    metadata and the constexpr values in parameter order (``JITFunction.run``'s last
    call, without the work before it)."""

    __slots__ = ("launcher", "function", "metadata", "tail", "stream")

    def __init__(self, kernel, tail: tuple, stream: Callable):
        self.launcher, self.function, self.metadata = kernel.run, kernel.function, kernel.packed_metadata
        self.tail, self.stream = tail, stream

    def __call__(self, grid, args, device):
        n = len(grid)
        self.launcher(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self.stream(device),
                      self.function, self.metadata, None, None, None, *args, *self.tail)


class _Interpreted:
    """An interpreted kernel's launch (``TRITON_INTERPRET=1``): its ``run``, the options bound."""

    __slots__ = ("fn", "options")

    def __init__(self, fn, options: dict):
        self.fn, self.options = fn, options

    def __call__(self, grid, args, device):
        self.fn.run(*args, grid=grid, warmup=False, **self.options)


def _no_device():
    return None


class Specialization:
    """A kernel with its constexprs and launch options bound: ``spec(grid, *args)``
    launches it with the runtime arguments only. A call site makes it once
    (:meth:`CachedKernel.specialize`, e.g. under an ``lru_cache`` of what decides the
    constexprs) and keeps it, so that a launch neither builds nor hashes the options.

    ``implied``: positions of tensor arguments whose dtype and alignment the call site
    guarantees from the other arguments and the constexprs — a buffer it allocates for
    the launch (a fresh allocation starts at its storage's base, which both allocators
    align to at least 64 bytes, in a dtype fixed by the kernel or equal to an argument's
    in the key) or a repeat of another argument. The key leaves them out (~0.15 µs a
    tensor); a call site must never list a view at an offset or a caller's tensor."""

    __slots__ = ("kernel", "options", "tag", "implied", "key")

    def __init__(self, kernel: "CachedKernel", options: dict, tag: int, implied: frozenset = frozenset()):
        self.kernel, self.options, self.tag, self.implied = kernel, options, tag, implied
        #: the key function, made at this specialization's first launch (the kinds are known then)
        self.key: Optional[Callable] = None

    def __call__(self, grid: Tuple[int, ...], *args) -> None:
        self.kernel.run(self, grid, args)


class CachedKernel:
    """A ``@triton.jit`` kernel launched through handles cached per specialization:
    ``kernel[grid](*args, **constexprs)``, ``kernel.launch(grid, *args, **constexprs)``,
    or, cheapest, ``kernel.specialize(**constexprs)(grid, *args)`` — the runtime arguments
    positional, the constexprs and options by keyword. Every launch goes through
    :meth:`run` (the launch counters hook it)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        #: ``(specialization's tag, device, key of the arguments)`` → handle
        self.handles: Dict[tuple, Callable] = {}
        self._specializations: Dict[tuple, Specialization] = {}
        self.hits = self.misses = 0
        self._kinds: Optional[str] = None
        self._key: Optional[Callable] = None
        self._compiled = not _interpreted(fn)
        #: the current device (compiled: Triton's driver, bound at the first launch)
        self._device: Callable = _no_device

    def __getitem__(self, grid):
        return lambda *args, **options: self.launch(grid, *args, **options)

    #: False: every launch through Triton's own ``run`` (``benchmarks/launch_overhead.py`` compares)
    enabled = True

    def specialize(self, implied: Tuple[int, ...] = (), **options) -> Specialization:
        """The :class:`Specialization` of these constexprs and options (one object per
        distinct set and ``implied`` positions, so its tag stands for them in the handles' keys)."""
        items = (tuple(implied),) + tuple(options.items()) if implied else tuple(options.items())
        spec = self._specializations.get(items)
        if spec is None:
            spec = self._specializations[items] = Specialization(self, options, len(self._specializations),
                                                                 frozenset(implied))
        return spec

    def launch(self, grid: Tuple[int, ...], *args, **options) -> None:
        spec = self._specializations.get(tuple(options.items()))   # (not specialize(**options): no second dict)
        self.run(spec if spec is not None else self.specialize(**options), grid, args)

    def run(self, spec: Specialization, grid: Tuple[int, ...], args: tuple) -> None:
        """Launch ``spec`` on ``args``: through the handle of their key (a hit), else
        through Triton's own ``run`` (:meth:`_miss`)."""
        key_fn = spec.key
        if key_fn is not None and self.enabled and (not self._compiled or _no_hooks()):
            device = self._device()
            try:
                handle = self.handles.get((spec.tag, device, key_fn(*args)))
            except (AttributeError, TypeError):   # arguments of other kinds: Triton's own launch
                handle = None
            if handle is not None:
                self.hits += 1
                handle(grid, args, device)
                return
        self._miss(grid, args, spec)

    def _miss(self, grid, args, spec: Specialization) -> None:
        """Launch through Triton's own ``run`` (it compiles what it has not), and keep a
        handle for this call's key when the arguments are of the kinds the key is made for."""
        self.misses += 1
        options = spec.options
        if not self.enabled:
            self.fn.run(*args, grid=grid, warmup=False, **options)
            return
        kinds = "".join(map(_kind, args))
        if self._kinds is None and "?" not in kinds:
            self._kinds, self._key = kinds, _key_function(kinds)
            if self._compiled:
                from triton.runtime import driver

                self._device = driver.active.get_current_device
        kernel = self.fn.run(*args, grid=grid, warmup=False, **options)
        if kinds != self._kinds or (self._compiled and not _no_hooks()):
            return
        if spec.key is None:
            spec.key = _key_function(kinds, spec.implied) if spec.implied else self._key
        key = (spec.tag, self._device(), spec.key(*args))
        if not self._compiled:
            self.handles[key] = _Interpreted(self.fn, options)
            return
        tail = _constexpr_tail(self.fn, len(args), options)
        if kernel is not None and tail is not None:
            from triton.runtime import driver

            self.handles[key] = _Compiled(kernel, tail, driver.active.get_current_stream)


def _interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:    # pragma: no cover - another Triton's layout
        return False
    return isinstance(fn, InterpretedFunction)


def _no_hooks() -> bool:
    """Whether no launch hook is set (a profiler's hooks see every launch through ``kernel[grid]``):
    None, or an empty chain (Triton 3.9's ``HookChain``)."""
    runtime = knobs.runtime
    return _empty_hook(runtime.launch_enter_hook) and _empty_hook(runtime.launch_exit_hook)


def _empty_hook(hook) -> bool:
    return hook is None or getattr(hook, "calls", None) == []


def _constexpr_tail(fn, n_args: int, options: dict) -> Optional[tuple]:
    """The values after the ``n_args`` positional arguments in the kernel's parameter
    order (the constexprs, given or defaulted), as ``JITFunction.run`` passes its
    bound arguments to the launcher; None when a runtime parameter is among them."""
    tail = []
    for p in fn.params[n_args:]:
        if not p.is_constexpr:
            return None
        if p.name in options:
            tail.append(options[p.name])
        elif p.has_default:
            tail.append(p.default)
        else:
            return None
    return tuple(tail)


class cached_kernels:
    """The kernels of a kernels' module (:mod:`.rowwise`, ...) as :class:`CachedKernel`,
    each under its own name, made on first use: ``rk = cached_kernels(rowwise)``,
    ``rk.rowwise_fwd[grid](...)`` (the module keeps the ``@triton.jit`` functions)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        from triton.runtime.jit import KernelInterface

        value = getattr(self._module, name)
        if isinstance(value, KernelInterface):   # (a constant of the module is handed on as it is)
            value = CachedKernel(value)
        setattr(self, name, value)
        return value

    def kernels(self):
        """The kernels made so far."""
        return [k for k in vars(self).values() if isinstance(k, CachedKernel)]
