"""Bad input: a clear ValueError/TypeError naming the argument and the expected shape."""

import pytest
import torch

import seqnorm
from seqnorm import functional as F
from seqnorm.masks import lengths_to_padding_mask

X = torch.randn(2, 3, 4)


@pytest.mark.parametrize("fn", [
    lambda **k: F.layer_norm(X, 4, **k),
    lambda **k: F.rms_norm(X, 4, **k),
    lambda **k: F.add_layer_norm(X, X, 4, **k),
    lambda **k: F.seq_batch_norm(X, None, None, training=True, **k),
    lambda **k: F.power_norm(X, torch.ones(4), **k),
    lambda **k: seqnorm.SeqBatchNorm(4)(X, **k),
])
def test_mask_errors(fn):
    with pytest.raises(ValueError, match=r"padding_mask must have shape .*\(2, 3\).*got \(3, 2\)"):
        fn(padding_mask=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(2, 3\).*got \(3,\)"):   # no broadcasting of a (T,) mask
        fn(padding_mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(1, 3\)"):           # nor of a (1, T) mask
        fn(padding_mask=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"padding_mask must have dtype torch.bool .*\(2, 3\).*torch.int64"):
        fn(padding_mask=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="padding_mask must be a bool torch.Tensor"):
        fn(padding_mask=[[False] * 3] * 2)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 3\].*\[-1, 4\]"):
        fn(lengths=torch.tensor([4, -1]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(B,\) = \(2,\), got \(3,\)"):
        fn(lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        fn(lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="either padding_mask or lengths"):
        fn(padding_mask=torch.zeros(2, 3, dtype=torch.bool), lengths=torch.tensor([1, 2]))


def test_lengths_to_padding_mask():
    assert lengths_to_padding_mask(torch.tensor([2, 0, 3]), 3).tolist() == [
        [False, False, True], [True, True, True], [False, False, False]]
    assert lengths_to_padding_mask(torch.tensor([], dtype=torch.long), 4).shape == (0, 4)


def test_rowwise_shape_errors():
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 5\) to match normalized_shape=\[5\], got \(2, 3, 4\)"):
        F.layer_norm(X, 5)
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\), got \(5,\)"):
        F.layer_norm(X, 4, torch.ones(5))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(1,\)"):
        F.layer_norm(X, 4, None, torch.ones(1))
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\), got \(3,\)"):
        F.rms_norm(X, 4, torch.ones(3))
    with pytest.raises(ValueError, match=r"residual must have the input's shape \(2, 3, 4\)"):
        F.add_layer_norm(X, X[:1], 4)
    with pytest.raises(ValueError, match="lengths describes a \\(B, T\\) token grid"):
        F.layer_norm(torch.randn(2, 3, 4, 5), 5, lengths=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        F.layer_norm([[1.0, 2.0]], 2)
    with pytest.raises(TypeError, match="floating-point"):
        F.layer_norm(torch.ones(2, 2, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="normalized_shape"):
        F.layer_norm(X, "four")


def test_featurewise_shape_errors():
    with pytest.raises(ValueError, match=r"expects input of shape \(B, T, D\) or \(N, D\), got 4-D"):
        F.seq_batch_norm(torch.randn(2, 3, 4, 5), None, None, training=True)
    with pytest.raises(ValueError, match=r"got 1-D"):
        seqnorm.SeqBatchNorm(4)(torch.randn(4))
    with pytest.raises(ValueError, match=r"got 4-D"):
        seqnorm.PowerNorm(4)(torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"running_mean must have shape \(4,\), got \(5,\)"):
        F.seq_batch_norm(X, torch.zeros(5), torch.ones(5))
    with pytest.raises(ValueError, match=r"SeqBatchNorm\(num_features=3\) expects input of shape \(B, T, 3\) or \(N, 3\), got \(2, 3, 4\)"):
        seqnorm.SeqBatchNorm(3)(X)
    with pytest.raises(ValueError, match=r"PowerNorm\(num_features=5\)"):
        seqnorm.PowerNorm(5)(X)
    with pytest.raises(ValueError, match="given together"):
        F.seq_batch_norm(X, torch.zeros(4), None)
    with pytest.raises(ValueError, match="momentum must be None or a float in"):
        F.seq_batch_norm(X, torch.zeros(4), torch.ones(4), training=True, momentum=1.5)
    with pytest.raises(ValueError, match="momentum must be None or a float"):
        seqnorm.SeqBatchNorm(4, momentum=-0.1)
    with pytest.raises(ValueError, match=r"running_phi must have shape \(4,\)"):
        F.power_norm(X, torch.ones(3))
    with pytest.raises(TypeError, match="running_phi"):
        F.power_norm(X, None)


def test_module_errors_leave_state_intact():
    bn = seqnorm.SeqBatchNorm(4).train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError):
        bn(X, padding_mask=torch.zeros(3, 2, dtype=torch.bool))
    one = torch.ones(2, 3, dtype=torch.bool)
    one[1, 2] = False
    with pytest.raises(ValueError, match="more than 1 real token"):
        bn(X, padding_mask=one)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_backend_selection_errors_and_context():
    assert seqnorm.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        seqnorm.set_backend("cuda-magic")
    with seqnorm.use_backend("torch"):
        assert seqnorm.get_backend() == "torch"
        assert torch.equal(F.layer_norm(X, 4), torch.nn.functional.layer_norm(X, (4,)))
    assert seqnorm.get_backend() == "auto"
    assert {"auto", "torch"} <= set(seqnorm.available_backends())


def test_addnorm_constructor_errors():
    with pytest.raises(ValueError, match="norm must be 'layer' or 'rms'"):
        seqnorm.AddNorm(4, norm="batch")
    with pytest.raises(ValueError, match="no bias"):
        seqnorm.AddNorm(4, norm="rms", bias=True)
