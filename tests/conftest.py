"""Shared test helpers."""

import os

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


@pytest.fixture(params=["torch", "reference", "fused"])
def backend(request):
    """Run the test once per backend."""
    import seqnorm

    with seqnorm.use_backend(request.param):
        yield request.param
