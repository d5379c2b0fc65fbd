"""The seed note's numbers, exactly as the note computes them (eps = 0)."""

import numpy as np
import pytest
import torch

import seqnorm
from seqnorm import functional as F
from seqnorm import reference as ref

Z = np.array([[1.0, 2.0], [3.0, 4.0]])
BATCH = np.array([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 3.0], [1.0, 4.0]]])


def test_layer_norm_rows():
    y, cache = ref.layer_norm_forward(Z, eps=0.0)
    np.testing.assert_allclose(cache["mean"][:, 0], [1.5, 3.5])
    np.testing.assert_allclose(cache["var"][:, 0], [0.25, 0.25])
    np.testing.assert_array_equal(y, [[-1, 1], [-1, 1]])
    torch.testing.assert_close(F.layer_norm(torch.tensor(Z), (2,), eps=0.0),
                               torch.tensor([[-1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64))


def test_batch_norm_columns_of_one_sentence():
    y, cache = ref.seq_batch_norm_forward(Z, eps=0.0)
    np.testing.assert_allclose(cache["batch_mean"], [2.0, 3.0])
    np.testing.assert_allclose(cache["batch_var"], [1.0, 1.0])
    np.testing.assert_array_equal(y, [[-1, -1], [1, 1]])
    # functional, on (N, D) and on a one-sentence batch (1, T, D)
    expected = torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(F.seq_batch_norm(torch.tensor(Z), None, None, training=True, eps=0.0), expected)
    torch.testing.assert_close(F.seq_batch_norm(torch.tensor(Z)[None], None, None, training=True, eps=0.0)[0],
                               expected)


def test_batch_of_two_sentences_feature_0():
    _, cache = ref.seq_batch_norm_forward(BATCH, eps=0.0)
    assert cache["batch_mean"][0] == pytest.approx(1.75)
    assert cache["batch_var"][0] == pytest.approx(0.6875)
    assert np.sqrt(cache["batch_var"][0]) == pytest.approx(0.8292, abs=5e-5)
    assert cache["count"] == 4
    # The module sees the same statistics (running_mean after one step with momentum 1)
    bn = seqnorm.SeqBatchNorm(2, eps=0.0, momentum=1.0).double()
    y = bn(torch.tensor(BATCH))
    assert bn.running_mean[0].item() == pytest.approx(1.75)
    assert bn.running_var[0].item() == pytest.approx(0.6875 * 4 / 3)  # torch stores the unbiased variance
    np.testing.assert_allclose(y[..., 0].detach().numpy(), (BATCH[..., 0] - 1.75) / np.sqrt(0.6875))


def test_layer_norm_pools_each_token_alone():
    _, cache = ref.layer_norm_forward(BATCH, eps=0.0)
    np.testing.assert_allclose(cache["mean"][..., 0], [[1.5, 3.5], [2.5, 2.5]])


def test_padding_shifts_naive_bn_but_not_masked_bn():
    padded = np.concatenate([BATCH, np.zeros((2, 1, 2))], axis=1)
    mask = np.array([[False, False, True]] * 2)
    _, naive = ref.seq_batch_norm_forward(padded, eps=0.0)
    _, masked = ref.seq_batch_norm_forward(padded, eps=0.0, padding_mask=mask)
    assert naive["batch_mean"][0] == pytest.approx(7 / 6)       # the pads pull the mean down
    assert masked["batch_mean"][0] == pytest.approx(1.75)       # the note's statistics survive
    assert masked["batch_var"][0] == pytest.approx(0.6875)
