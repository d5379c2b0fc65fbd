"""RMSNorm's language-model variants on every backend: a zero-centred γ (``offset``) and the
casting modes (``"float32"``, ``"llama"``), forward and backward, against the float64 reference
and against the families' own formulas (seqnorm.rms_variants)."""

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import seqnorm
from seqnorm import functional as F
from seqnorm import reference

from conftest import poisoned_case


def _to_np(t):
    return t.detach().double().cpu().numpy()


def _llama(x, w, eps, offset=0.0):
    """Llama's own module: x̂ in float32, cast to the input dtype, then γ (`offset + γ`)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (w if not offset else w.float() + offset) * h.to(x.dtype)


def _gemma(x, w, eps, offset=1.0):
    """Gemma's own module: everything in float32, (offset + γ), cast once."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (offset + w.float())).type_as(x)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("casting", ["float32", "llama"])
def test_forward_and_backward_match_the_reference(backend, offset, casting):
    """float32 inputs (both castings are one computation there), NaN at padding: y, dx, dγ against
    the float64 reference with the offset; padded tokens exactly 0 with gradient 0."""
    x, _, w, _, mask, dy = poisoned_case((3, 5, 17), 3, torch.float32)
    w = (w - 1.0) if offset else w                      # a zero-centred γ is stored near 0
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = F.rms_norm(x, (17,), w, 1e-6, padding_mask=mask, offset=offset, casting=casting)
    y.backward(dy)
    want, cache = reference.rms_norm_forward(_to_np(x), _to_np(w), 1e-6, mask.numpy(), offset=offset)
    dx, dw = reference.rms_norm_backward(_to_np(dy), cache)
    np.testing.assert_allclose(_to_np(y), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(_to_np(x.grad), dx, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(_to_np(w.grad), dw, rtol=2e-4, atol=2e-4)
    assert torch.equal(y[mask], torch.zeros_like(y[mask]))
    assert torch.equal(x.grad[mask], torch.zeros_like(x.grad[mask]))


def test_the_offset_is_not_a_no_op(backend):
    """Teeth: with offset 1 the output is x̂ ⊙ (1 + γ), not x̂ ⊙ γ."""
    x = torch.randn(2, 3, 8)
    w = torch.randn(8) * 0.1
    y0 = F.rms_norm(x, (8,), w, 1e-6)
    y1 = F.rms_norm(x, (8,), w, 1e-6, offset=1.0)
    torch.testing.assert_close(y1, F.rms_norm(x, (8,), w + 1.0, 1e-6))
    assert not torch.allclose(y0, y1)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_offset_and_casting(backend, masked):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen).requires_grad_()
    r = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen).requires_grad_()
    w = (torch.randn(5, dtype=torch.float64, generator=gen) * 0.1).requires_grad_()
    mask = torch.tensor([[False, False, True], [False, True, True]]) if masked else None
    assert gradcheck(lambda x, w: F.rms_norm(x, (5,), w, 1e-6, padding_mask=mask, offset=1.0), (x, w))
    assert gradcheck(lambda x, w: F.rms_norm(x, (5,), w, 1e-6, padding_mask=mask, casting="llama"), (x, w))
    assert gradcheck(lambda x, r, w: F.add_rms_norm(x, r, (5,), w, 1e-6, prenorm=True, padding_mask=mask,
                                                    offset=1.0), (x, r, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_castings_are_the_families_own(backend, dtype):
    """In 16 bits: "llama" is Llama's module (x̂ rounded, then γ in γ's dtype), "float32" with
    offset 1 is Gemma's (all float32, rounded once), within one rounding; forward and dγ, dx."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 6, 40, generator=gen) * 3).to(dtype)
    w_l = (torch.rand(40, generator=gen) + 0.5).to(dtype)
    w_g = (torch.randn(40, generator=gen) * 0.2).to(dtype)
    dy = torch.randn(4, 6, 40, generator=gen).to(dtype)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for casting, offset, w, own in (("llama", 0.0, w_l, _llama), ("float32", 1.0, w_g, _gemma)):
        leaves = [(x.clone().requires_grad_(), w.clone().requires_grad_()) for _ in range(2)]
        got = F.rms_norm(*leaves[0][:1], (40,), leaves[0][1], 1e-6, offset=offset, casting=casting)
        want = own(leaves[1][0], leaves[1][1], 1e-6, offset)
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=1e-5)
        got.backward(dy)
        want.backward(dy)
        for a, b in zip(leaves[0], leaves[1]):
            assert a.grad.dtype == b.grad.dtype
            scale = float(b.grad.float().abs().max())
            assert float((a.grad.float() - b.grad.float()).abs().max()) <= 4 * ulp * scale + 1e-5


def test_llama_casting_rounds_before_the_weight():
    """Teeth for "llama": in bfloat16 it differs from "float32" (one rounding) on some element, and
    equals Llama's own formula bit for bit on the torch backend."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 64, generator=gen).bfloat16()
    w = (torch.rand(64, generator=gen) + 0.5).bfloat16()
    with seqnorm.use_backend("torch"):
        llama = F.rms_norm(x, (64,), w, 1e-6, casting="llama")
        once = F.rms_norm(x, (64,), w, 1e-6)
    assert torch.equal(llama, _llama(x, w, 1e-6))
    assert not torch.equal(llama, once)


def test_llama_casting_follows_the_weights_dtype():
    """Llama's module returns γ's dtype when it is wider than the input (a float32 γ, bf16 input)."""
    x = torch.randn(3, 8).bfloat16()
    w = torch.rand(8) + 0.5
    y = F.rms_norm(x, (8,), w, 1e-6, casting="llama")
    assert y.dtype == torch.float32
    assert torch.equal(y, _llama(x, w, 1e-6))


@pytest.mark.parametrize("casting", ["float32", "llama"])
def test_add_norm_offset_and_casting(backend, casting):
    x, r, w, _, mask, dy = poisoned_case((2, 4, 9), 5, torch.float32)
    w = w - 1.0
    layer = seqnorm.AddNorm(9, eps=1e-6, norm="rms", prenorm=True, offset=1.0, casting=casting)
    with torch.no_grad():
        layer.weight.copy_(w)
    xs = x.clone().requires_grad_()
    y, s = layer(xs, r, padding_mask=mask)
    want, s_ref, cache = reference.add_norm_forward(_to_np(x), _to_np(r), _to_np(w), None, 1e-6, mask.numpy(),
                                                    center=False, offset=1.0)
    np.testing.assert_allclose(_to_np(y), want, rtol=2e-5, atol=2e-5)
    y.backward(dy)
    dx, _, dw, _ = reference.add_norm_backward(_to_np(dy), cache)
    np.testing.assert_allclose(_to_np(layer.weight.grad), dw, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(_to_np(xs.grad), dx, rtol=2e-4, atol=2e-5)


def test_module_offset_init_state_dict_and_repr():
    m = seqnorm.RMSNorm(6, eps=1e-6, offset=1.0, casting="llama")
    assert torch.equal(m.weight, torch.zeros(6))          # offset + γ starts at 1
    assert list(m.state_dict()) == ["weight"]
    assert "offset=1.0" in repr(m) and "casting='llama'" in repr(m)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(m(x), torch.nn.functional.rms_norm(x, (6,), None, 1e-6))
    assert torch.equal(seqnorm.AddNorm(6, norm="rms", offset=1.0).weight, torch.zeros(6))
    plain = seqnorm.RMSNorm(6)
    assert plain.offset == 0.0 and plain.casting == "float32" and "offset" not in repr(plain)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(offset="1"), TypeError, "offset"),
    (dict(offset=True), TypeError, "offset"),
    (dict(offset=float("inf")), ValueError, "offset"),
    (dict(casting="none"), ValueError, "casting"),
    (dict(casting="gemma"), ValueError, "casting"),
])
def test_bad_offset_or_casting_names_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        seqnorm.RMSNorm(4, **kwargs)
    with pytest.raises(error, match=match):
        F.rms_norm(torch.randn(2, 4), (4,), torch.ones(4), **kwargs)


def test_offset_needs_a_weight():
    with pytest.raises(ValueError, match="offset"):
        seqnorm.RMSNorm(4, elementwise_affine=False, offset=1.0)
    with pytest.raises(ValueError, match="offset"):
        F.rms_norm(torch.randn(2, 4), (4,), None, offset=1.0)
    with pytest.raises(ValueError, match="offset and casting"):
        seqnorm.AddNorm(4, norm="layer", offset=1.0)


def test_per_head_inputs_take_the_context_mask(backend):
    """A (B, T, H, D) input (Qwen3's q_norm) inside seqnorm.padding((B, T) mask): every head of
    a padded token is exactly 0, real tokens as without padding."""
    mask = torch.tensor([[False, False, True], [False, True, True]])
    x = torch.randn(2, 3, 4, 8)
    x[mask] = float("nan")
    m = seqnorm.RMSNorm(8, eps=1e-6, casting="llama")
    with seqnorm.padding(mask):
        y = m(x)
    assert torch.equal(y[mask], torch.zeros_like(y[mask]))
    torch.testing.assert_close(y[~mask], m(x[~mask]))


def test_per_head_inputs_after_the_transpose_and_an_ambiguous_layout():
    """(B, H, T, D) finds T on its third axis; where H == T the layout is ambiguous: no padding
    (real tokens are what they are either way), and no error inside the model."""
    mask = torch.tensor([[False, False, True], [False, True, True]])
    m = seqnorm.RMSNorm(8, eps=1e-6)
    x = torch.randn(2, 4, 3, 8)                                   # (B, H=4, T=3, D)
    with seqnorm.padding(mask):
        y = m(x)
    pad = mask[:, None, :].expand(2, 4, 3)
    assert torch.equal(y[pad], torch.zeros_like(y[pad]))
    torch.testing.assert_close(y[~pad], m(x)[~pad])
    x = torch.randn(2, 3, 3, 8)                                   # H == T: ambiguous
    with seqnorm.padding(mask):
        y = m(x)
    torch.testing.assert_close(y, m(x))
