"""Nested jagged tensors: every seqnorm norm gives, at every real token, what
it gives the padded batch with its mask — values, input gradients, parameter
gradients and running statistics — and padding is never materialized."""

import copy

import pytest
import torch

import seqnorm

LENGTHS = [5, 1, 8, 3]
D = 6


def _jagged_and_padded(seed=0, d=D, dtype=torch.float32):
    torch.manual_seed(seed)
    seqs = [torch.randn(n, d, dtype=dtype) * 2 + 0.5 for n in LENGTHS]
    nt = torch.nested.nested_tensor(seqs, layout=torch.jagged, requires_grad=True)
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=float("nan"))
    mask = torch.arange(padded.shape[1])[None, :] >= torch.tensor(LENGTHS)[:, None]
    return nt, padded.requires_grad_(), mask


def _modules():
    torch.manual_seed(1)
    mods = {
        "layer": seqnorm.LayerNorm(D), "rms": seqnorm.RMSNorm(D), "masked_batch": seqnorm.SeqBatchNorm(D),
        "power": seqnorm.PowerNorm(D), "group": seqnorm.GroupNorm(2, D, channels_last=True),
        "instance": seqnorm.InstanceNorm1d(D, affine=True, track_running_stats=True, channels_last=True),
    }
    for m in mods.values():
        for p in m.parameters():
            with torch.no_grad():
                p.normal_()
    return mods


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(_modules()))
def test_module_on_jagged_equals_module_on_padded_with_mask(kind, train):
    jag_mod = _modules()[kind].train(train)
    pad_mod = copy.deepcopy(jag_mod)
    nt, padded, mask = _jagged_and_padded()
    dy = [torch.randn(n, D, generator=torch.Generator().manual_seed(n)) for n in LENGTHS]
    y_nt = jag_mod(nt)
    y_pad = pad_mod(padded, padding_mask=mask)
    assert y_nt.is_nested
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(y_nt.unbind()[i], y_pad[i, :n], atol=1e-5, rtol=1e-5)
    dy_pad = torch.zeros_like(padded)
    for i, n in enumerate(LENGTHS):
        dy_pad[i, :n] = dy[i]
    torch.autograd.backward(y_nt, torch.nested.nested_tensor_from_jagged(torch.cat(dy), y_nt.offsets()))
    y_pad.backward(dy_pad)
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(nt.grad.unbind()[i], padded.grad[i, :n], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(jag_mod.named_parameters(), pad_mod.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-5, msg=name)
    for (name, b), c in zip(jag_mod.named_buffers(), pad_mod.buffers()):
        torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-5, msg=name)


def test_add_norm_on_jagged_and_the_errors():
    nt, padded, mask = _jagged_and_padded()
    res_nt, res_pad, _ = _jagged_and_padded(seed=3)
    add = seqnorm.AddNorm(D, prenorm=True)
    y_nt, s_nt = add(nt, res_nt)
    y_pad, s_pad = add(padded, res_pad, padding_mask=mask)
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(y_nt.unbind()[i], y_pad[i, :n])
        torch.testing.assert_close(s_nt.unbind()[i], s_pad[i, :n])
    with pytest.raises(ValueError, match="carries its own lengths; padding_mask and lengths must be None"):
        seqnorm.LayerNorm(D)(nt, padding_mask=mask)
    with pytest.raises(ValueError, match="residual must be a nested jagged tensor with the input's sequences"):
        add(nt, padded)
    with pytest.raises(ValueError, match="num_groups must be a positive int dividing the 6 channels"):
        seqnorm.functional.group_norm(nt, 4)


def test_padding_context_is_ignored_for_jagged_input():
    nt, _, _ = _jagged_and_padded()
    ln = seqnorm.LayerNorm(D)
    with seqnorm.padding(lengths=torch.tensor([1, 1, 1, 1])):
        inside = ln(nt)
    torch.testing.assert_close(inside.values(), ln(nt).values())


@pytest.mark.parametrize("kind", ["layer", "rms", "add_layer"])
def test_row_wise_norms_take_a_strided_nested_tensor(kind):
    """A strided nested tensor (what nn.TransformerEncoder's fast path passes its layers in eval):
    each sequence normalized alone, values and gradients as the module gives that sequence."""
    torch.manual_seed(3)
    seqs = [torch.randn(n, D) * 2 + 0.5 for n in LENGTHS]
    norm = seqnorm.RMSNorm(D) if kind == "rms" else seqnorm.LayerNorm(D)
    with torch.no_grad():
        norm.weight.normal_()
    leaves = [t.clone().requires_grad_() for t in seqs]
    nt = torch.nested.as_nested_tensor(leaves)
    assert nt.layout == torch.strided
    if kind == "add_layer":
        add = seqnorm.AddNorm(D, prenorm=True)    # (y, the sum s)
        rs = [torch.randn_like(t) for t in seqs]
        y, s = add(nt, torch.nested.as_nested_tensor(rs))
        want = [add(t, r) for t, r in zip(seqs, rs)]
        for got, (wy, ws), gs in zip(y.unbind(), want, s.unbind()):
            assert torch.equal(got, wy) and torch.equal(gs, ws)
        with pytest.raises(ValueError, match="residual must be a strided nested tensor"):
            add(nt, torch.nested.as_nested_tensor(rs[:-1]))
        return
    y = norm(nt)
    assert y.is_nested and y.layout == torch.strided
    for got, t in zip(y.unbind(), seqs):
        assert torch.equal(got, norm(t))
    sum((t * t).sum() for t in y.unbind()).backward()
    for leaf, t in zip(leaves, seqs):
        alone = t.clone().requires_grad_()
        (norm(alone) ** 2).sum().backward()
        torch.testing.assert_close(leaf.grad, alone.grad)
    with pytest.raises(ValueError, match="carries its own lengths"):
        seqnorm.functional.layer_norm(nt, (D,), padding_mask=torch.zeros(len(LENGTHS), 8, dtype=torch.bool))


def test_padding_safe_transformer_encoder_on_its_nested_fast_path():
    """nn.TransformerEncoder in eval turns a batch with src_key_padding_mask into a strided nested
    tensor; the padding-safe model (its attention hooks and norms) takes it, real tokens as stock."""
    from torch import nn
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2).eval()
    x = torch.randn(2, 10, 16)
    lengths = torch.tensor([10, 6])
    kpm = torch.arange(10)[None] >= lengths[:, None]
    with torch.no_grad():
        stock = enc(x, src_key_padding_mask=kpm)
        safe = seqnorm.make_padding_safe(copy.deepcopy(enc))
        with seqnorm.padding(lengths=lengths):
            y = safe(x, src_key_padding_mask=kpm)
        alone = safe(x[1:, :6])
    torch.testing.assert_close(y[~kpm], stock[~kpm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[1, :6], alone[0], rtol=1e-5, atol=1e-6)
