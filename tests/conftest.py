"""Shared test helpers."""

import os
import importlib.util
import tempfile

# torch.compile's on-disk graph cache does not key on a custom op's schema: a graph
# compiled against another checkout's seqnorm ops (a changed backward signature) is
# reused and fails at run time. The suite compiles into a cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="seqnorm-inductor-"))

import numpy as np
import pytest
import torch
from hypothesis import settings

# The property and fuzz suites draw the same examples on every run by default, so
# that CI is reproducible; HYPOTHESIS_PROFILE=explore draws fresh random ones
# (run it locally, several times, after touching a kernel).
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Without a GPU, Triton's interpreter runs the triton backend's kernels on CPU tensors
# (set before any kernel is defined); with one, they run on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (the default, see pyproject's addopts) each worker gets its share of the
# cores: torch's default of one thread per core in every worker would oversubscribe the
# machine (and make OpenMP threads spin against each other). Tests that need a thread count
# set it themselves (the ``threads`` fixture).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

#: the backends every op test runs under: triton where Triton is installed
BACKENDS = ["torch", "reference", "fused"] + (["triton"] if importlib.util.find_spec("triton") else [])


def random_mask(b, t, rng, p=0.3, full_row=None):
    """A (B, T) bool padding mask (True = pad); ``full_row`` is fully padded."""
    m = rng.random((b, t)) < p
    if full_row is not None:
        m[full_row] = True
    return m


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run a test with 1 and with 2 torch threads (Numba follows torch)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def to_t(a, dtype=torch.float64, requires_grad=False):
    t = torch.as_tensor(np.asarray(a), dtype=dtype).clone()
    return t.requires_grad_(requires_grad)


def assert_same_bits_for_thread_counts(run, counts=(1, 2, 2)):
    """Call ``run()`` (a list of tensors) under each torch thread count (Numba
    follows it) and assert that every run gives the same bits as the first."""
    before = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


def to_np(t):
    return None if t is None else t.detach().to(torch.float64).cpu().numpy().copy()


@pytest.fixture(params=BACKENDS)
def backend(request):  # every backend; the test runs once under each
    """Run the test once per backend."""
    import seqnorm

    with seqnorm.use_backend(request.param):
        yield request.param


# ---------------------------------------------------------------------------
# The op table every backend test runs: one entry per kind (seqnorm.kinds) that
# has a functional op, called the same way and checked against the same
# float64 reference everywhere.
# ---------------------------------------------------------------------------

from seqnorm import functional as F  # noqa: E402
from seqnorm import kinds  # noqa: E402
from seqnorm import reference as ref  # noqa: E402

#: layer, rms, add_layer, add_rms, masked_batch, power
# the (B, T, D) ops; the channels-first group-wise ones have tests of their own (test_groupwise.py)
OPS = tuple(name for name, k in kinds.KINDS.items() if k.op and not k.channels_first)
ROWWISE_OPS = tuple(op for op in OPS if not kinds.kind(op).feature_dim)
#: what each op differentiates, in the order :func:`reference_op`'s backward returns it
GRAD_ARGS = {"layer": ("x", "w", "b"), "rms": ("x", "w"), "add_layer": ("x", "r", "w", "b"),
             "add_rms": ("x", "r", "w"), "masked_batch": ("x", "w", "b"), "power": ("x", "w", "b")}
#: the eps each op runs with here (RMSNorm's default would depend on the dtype)
EPS = {"rms": 1e-6, "add_rms": 1e-6}


def call_op(op, x, w, b, mask, *, r=None, eps=None, training=True, running=None, momentum=0.1):
    """Run ``op`` through ``seqnorm.functional``; returns ``(y, s)``, ``s`` the sum of
    an Add & Norm (``prenorm=True``) and None for the others. ``running`` is
    ``(running_mean, running_var)`` for masked_batch, ``(running_phi, running_nu)``
    for power (both updated in place in training)."""
    d = x.shape[-1]
    eps = EPS.get(op, 1e-5) if eps is None else eps
    if op == "layer":
        return F.layer_norm(x, d, w, b, eps, padding_mask=mask), None
    if op == "rms":
        return F.rms_norm(x, d, w, eps, padding_mask=mask), None
    if op == "add_layer":
        return F.add_layer_norm(x, r, d, w, b, eps, prenorm=True, padding_mask=mask)
    if op == "add_rms":
        return F.add_rms_norm(x, r, d, w, eps, prenorm=True, padding_mask=mask)
    first, second = running if running is not None else (None, None)
    if op == "masked_batch":
        return F.seq_batch_norm(x, first, second, w, b, training=training, momentum=momentum, eps=eps,
                                padding_mask=mask), None
    if op == "power":
        return F.power_norm(x, first, second, w, b, training=training, momentum=momentum, eps=eps,
                            padding_mask=mask), None
    raise ValueError(op)


def reference_op(op, x, w, b, mask, *, r=None, eps=None, training=True, running=None, momentum=0.1):
    """The float64 reference of :func:`call_op` on NumPy arrays (``w``, ``b``,
    ``r`` may be None): ``(y, backward)`` with ``backward(dy)`` the gradients of
    :data:`GRAD_ARGS` (for power, then ν after Algorithm 1's update, or None)."""
    eps = EPS.get(op, 1e-5) if eps is None else eps
    if op == "layer":
        y, c = ref.layer_norm_forward(x, w, b, eps, mask)
        return y, lambda dy: ref.layer_norm_backward(dy, c)
    if op == "rms":
        y, c = ref.rms_norm_forward(x, w, eps, mask)
        return y, lambda dy: ref.rms_norm_backward(dy, c)
    if op in ("add_layer", "add_rms"):
        center = op == "add_layer"
        y, _, c = ref.add_norm_forward(x, r, w, b if center else None, eps, mask, center=center)

        def backward(dy):
            dx, dr, dw, db = ref.add_norm_backward(dy, c)
            return (dx, dr, dw, db) if center else (dx, dr, dw)
        return y, backward
    first, second = running if running is not None else (None, None)
    if op == "masked_batch":
        y, c = ref.seq_batch_norm_forward(x, w, b, eps, mask, first, second, training or first is None)
        return y, lambda dy: ref.seq_batch_norm_backward(dy, c)
    if op == "power":
        y, c = ref.power_norm_forward(x, first, w, b, eps, mask)
        return y, lambda dy: ref.power_norm_backward(dy, c, second if training else None, factor=momentum)
    raise ValueError(op)


@pytest.fixture
def fused():
    """Run the test on the fused kernels (skipped where Numba is missing)."""
    pytest.importorskip("numba")
    import seqnorm

    with seqnorm.use_backend("fused"):
        yield


def poisoned_case(shape, seed, dtype, two_real=False):
    """``(x, r, w, b, mask, dy)`` for an op test: ``x (B, T, D)`` around 0.5 with NaN
    at every padded token (padding must never be read), the last sequence all
    padding, ``two_real``: the first two tokens real (BatchNorm needs two)."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
    r = torch.randn(shape, generator=gen).to(dtype)
    w = (torch.rand(d, generator=gen) + 0.5).to(dtype)
    b = torch.randn(d, generator=gen).to(dtype)
    mask = torch.rand(shape[:2], generator=gen) < 0.3
    if shape[0] > 1:
        mask[-1] = True
    if two_real and mask.numel() > 1:
        mask.view(-1)[:2] = False
    x = x.masked_fill(mask.unsqueeze(-1), float("nan"))
    dy = torch.randn(shape, generator=gen)
    return x, r, w, b, mask, dy
