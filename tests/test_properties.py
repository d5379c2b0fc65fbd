"""Property tests (hypothesis): outputs at real tokens never depend on padding.

For LayerNorm, RMSNorm and masked SeqBatchNorm the outputs at real tokens do
not change when padding is added (longer T, or whole padded sequences), when
the padded positions hold other values (NaN included), or, for the row-wise
norms, when the other sequences of the batch change.
"""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqnorm import functional as F
from seqnorm import reference as ref

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def padded_batches(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 6))
    d = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, t + 1, size=b)
    if lengths.sum() < 2:                    # BN needs two real tokens to train
        lengths[0] = t if t >= 2 else 1
        if lengths.sum() < 2:
            lengths = np.append(lengths, 1)
            b += 1
    x = rng.normal(size=(b, t, d)) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)
    mask = np.arange(t)[None, :] >= lengths[:, None]
    extra_t = draw(st.integers(0, 3))
    extra_b = draw(st.integers(0, 2))
    return x, mask, extra_t, extra_b, rng


def _norms(d):
    w = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    b = torch.linspace(-1.0, 1.0, d, dtype=torch.float64)
    return {
        "layer": lambda x, m: F.layer_norm(x, d, w, b, padding_mask=m),
        "rms": lambda x, m: F.rms_norm(x, d, w, 1e-6, padding_mask=m),
        "masked_batch": lambda x, m: F.seq_batch_norm(x, None, None, w, b, training=True, padding_mask=m),
    }


def _grow(x, mask, extra_t, extra_b, rng, fill):
    """Append ``extra_t`` padded steps to every sequence and ``extra_b`` padded sequences."""
    b, t, d = x.shape
    big = np.full((b + extra_b, t + extra_t, d), fill)
    big_mask = np.ones((b + extra_b, t + extra_t), bool)
    big[:b, :t] = x
    big_mask[:b, :t] = mask
    junk = rng.normal(size=big.shape) * 1e3
    big = np.where(big_mask[..., None] & (fill == 0.0), junk, big)
    return big, big_mask


@SETTINGS
@given(padded_batches(), st.sampled_from([0.0, np.nan, np.inf]))
def test_adding_padding_changes_no_real_output(case, fill):
    x, mask, extra_t, extra_b, rng = case
    b, t, d = x.shape
    big, big_mask = _grow(x, mask, extra_t, extra_b, rng, fill)
    real = torch.tensor(~mask)
    for name, fn in _norms(d).items():
        y = fn(torch.tensor(x), torch.tensor(mask))
        y_big = fn(torch.tensor(big), torch.tensor(big_mask))
        torch.testing.assert_close(y_big[:b, :t][real], y[real], atol=1e-6, rtol=1e-6, msg=name)
        assert torch.all(y_big[torch.tensor(big_mask)] == 0), name


@SETTINGS
@given(padded_batches())
def test_padded_contents_do_not_matter(case):
    x, mask, _, _, rng = case
    d = x.shape[-1]
    other = np.where(mask[..., None], rng.normal(size=x.shape) * 1e6, x)
    other[mask] = np.nan if rng.random() < 0.5 else other[mask]
    for name, fn in _norms(d).items():
        y1 = fn(torch.tensor(x), torch.tensor(mask))
        y2 = fn(torch.tensor(other), torch.tensor(mask))
        assert torch.equal(y1, y2), name


@SETTINGS
@given(padded_batches())
def test_rowwise_outputs_ignore_the_other_sequences(case):
    x, mask, _, _, rng = case
    b, t, d = x.shape
    others = x.copy()
    others[1:] = rng.normal(size=others[1:].shape) * 100
    for name in ("layer", "rms"):
        fn = _norms(d)[name]
        y1 = fn(torch.tensor(x), torch.tensor(mask))[0]
        y2 = fn(torch.tensor(others), torch.tensor(mask))[0]
        alone = fn(torch.tensor(x[:1]), torch.tensor(mask[:1]))[0]
        torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(y1, alone, atol=1e-6, rtol=1e-6)


@SETTINGS
@given(padded_batches())
def test_masked_batch_norm_matches_real_tokens_only(case):
    """Masked SeqBatchNorm equals plain BatchNorm over the gathered real tokens."""
    x, mask, _, _, _ = case
    y = F.seq_batch_norm(torch.tensor(x), None, None, training=True, padding_mask=torch.tensor(mask))
    gathered, _ = ref.seq_batch_norm_forward(x[~mask])
    np.testing.assert_allclose(y[torch.tensor(~mask)].numpy(), gathered, rtol=1e-7, atol=1e-7)


@SETTINGS
@given(padded_batches(), st.sampled_from([0.0, np.nan]))
def test_power_norm_running_statistic_ignores_padding(case, fill):
    x, mask, extra_t, extra_b, rng = case
    d = x.shape[-1]
    big, big_mask = _grow(x, mask, extra_t, extra_b, rng, fill)
    phi_a, phi_b = torch.ones(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    F.power_norm(torch.tensor(x), phi_a, training=True, padding_mask=torch.tensor(mask))
    F.power_norm(torch.tensor(big), phi_b, training=True, padding_mask=torch.tensor(big_mask))
    torch.testing.assert_close(phi_a, phi_b, atol=1e-9, rtol=1e-9)
