"""Shared test helpers."""

import numpy as np
import pytest
import torch


def random_mask(b, t, rng, p=0.3, full_row=None):
    """A (B, T) bool padding mask (True = pad); ``full_row`` is fully padded."""
    m = rng.random((b, t)) < p
    if full_row is not None:
        m[full_row] = True
    return m


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def to_t(a, dtype=torch.float64, requires_grad=False):
    t = torch.as_tensor(np.asarray(a), dtype=dtype).clone()
    return t.requires_grad_(requires_grad)


def to_np(t):
    return None if t is None else t.detach().to(torch.float64).cpu().numpy().copy()


@pytest.fixture(params=["torch", "reference", "fused"])
def backend(request):
    """Run the test once per backend."""
    import seqnorm

    with seqnorm.use_backend(request.param):
        yield request.param
