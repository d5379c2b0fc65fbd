"""The CPU fast paths of the module calls (issue 16: host time per call) and their caches.

A LayerNorm / RMSNorm / SeqBatchNorm (training) module call on a plain CPU tensor
takes a short path (``functional._host_rowwise`` / ``_host_batch_norm_train``) that
reads the mask on the host once per mask object and version
(``masks.host_rows``). These tests hold it to the general path: the same values
and gradients (bit for bit where the ops are the same), the same errors, padded
rows exactly 0 with NaN/Inf there reaching nothing, and caches that see a mask
changed in place, another mask of the same shape, and inference tensors.
"""

import warnings

import pytest
import torch

import seqnorm
from seqnorm import functional as F
from seqnorm import masks, running

B, T, D = 3, 7, 16


def _data(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=dtype)
    lengths = torch.tensor([T, T - 2, 3])
    mask = torch.arange(T)[None, :] >= lengths[:, None]
    x[1, -2:] = float("nan")                 # padding holding NaN / Inf must reach nothing
    x[2, -1] = float("inf")
    return x, mask, lengths


def _rowwise_modules(dtype):
    torch.manual_seed(1)
    mods = [seqnorm.LayerNorm(D, dtype=dtype), seqnorm.LayerNorm(D, bias=False, dtype=dtype),
            seqnorm.LayerNorm(D, elementwise_affine=False, dtype=dtype), seqnorm.RMSNorm(D, dtype=dtype),
            seqnorm.RMSNorm(D, eps=1e-3, elementwise_affine=False, dtype=dtype)]
    with torch.no_grad():
        for m in mods:
            for p in m.parameters():
                p.copy_(torch.randn_like(p))
    return mods


def _general(m, x, padding_mask=None, lengths=None):
    """The general (functional) path of the same module call."""
    if isinstance(m, seqnorm.LayerNorm):
        return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps, padding_mask=padding_mask,
                            lengths=lengths)
    return F.rms_norm(x, m.normalized_shape, m.weight, m.eps, padding_mask=padding_mask, lengths=lengths)


def _grads(y, inputs, seed=2):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("how", ["padding_mask", "lengths", "context", "context_time_first"])
def test_rowwise_module_equals_the_general_path_bit_for_bit(dtype, how):
    x, mask, lengths = _data(dtype)
    for m in _rowwise_modules(dtype):
        for grad in (True, False):
            xa, xb = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                if how == "padding_mask":
                    ya = m(xa, padding_mask=mask)
                elif how == "lengths":
                    ya = m(xa, lengths=lengths)
                    ya = m(xa, lengths=lengths)    # the second call finds the lengths' mask cached
                elif how == "context":
                    with seqnorm.padding(lengths=lengths):
                        m(xa)
                        ya = m(xa)
                else:                               # (T, B, D) activations, the context's transposed mask
                    xa, xb = xa.transpose(0, 1), xb.transpose(0, 1)
                    with seqnorm.padding(mask, batch_first=False):
                        m(xa)
                        ya = m(xa)
                pad = mask if how != "context_time_first" else mask.t()
                yb = _general(m, xb, padding_mask=pad)
            assert torch.equal(ya, yb), (type(m).__name__, grad)
            assert torch.all(ya[pad] == 0)
            if grad:
                grads_a = _grads(ya, [xa] + list(m.parameters()))
                grads_b = _grads(yb, [xb] + list(m.parameters()))
                for ga, gb in zip(grads_a, grads_b):
                    assert torch.equal(ga, gb)
                    assert torch.isfinite(ga).all()
                assert torch.all(grads_a[0][pad] == 0)


def test_rowwise_fast_path_is_taken_and_declines_what_it_does_not_cover():
    x, mask, lengths = _data()
    ln = seqnorm.LayerNorm(D)
    take = lambda x, m=mask, **kw: F._host_rowwise(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps, m, None,
                                                  True, **kw)
    assert take(x) is not None
    assert take(x.half()) is None                                  # low precision: the general path casts
    assert take(x, mask.int()) is None                             # a wrong mask: the general path raises
    assert take(x, mask[:, :-1]) is None
    assert F._host_rowwise(x, (T, D), None, None, 1e-5, mask[:, 0], None, True) is None   # 2-D normalized shape
    with seqnorm.use_backend("reference"):
        assert take(x) is None
    real = running.sync_free
    try:
        running.sync_free = lambda t: True                          # the policy of a GPU / a trace
        assert take(x) is None
    finally:
        running.sync_free = real


def test_a_large_non_contiguous_input_takes_the_host_ops_bit_for_bit():
    """Above the masked_fill size a contiguous input is filled by index; a non-contiguous one (a
    transposed (B, C, T) activation, as wav2vec2's feature projection gets) has no (R, D) view and
    is filled through the mask's view: the host ops, the general path's bits."""
    torch.manual_seed(3)
    ln = seqnorm.LayerNorm(32)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    x = torch.randn(2, 32, 100).transpose(1, 2)           # (2, 100, 32), non-contiguous
    assert not x.is_contiguous() and x.numel() > F._HOST_MASKED_FILL_MAX
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[1, 60:] = True
    for grad in (True, False):
        xa, xb = x.detach().clone().requires_grad_(grad), x.detach().clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            assert F._host_rowwise(xa, ln.normalized_shape, ln.weight, ln.bias, ln.eps, mask, None, True) is not None
            ya, yb = ln(xa, padding_mask=mask), _general(ln, xb, padding_mask=mask)
        assert torch.equal(ya, yb) and torch.all(ya[mask] == 0)
        if grad:
            for ga, gb in zip(_grads(ya, [xa] + list(ln.parameters())), _grads(yb, [xb] + list(ln.parameters()))):
                assert torch.equal(ga, gb)


@pytest.mark.parametrize("bad,error", [
    (lambda mask: mask.float(), TypeError),
    (lambda mask: mask[:, :-1], ValueError),
    (lambda mask: [[False] * T] * B, TypeError),
])
def test_rowwise_module_still_validates_the_mask(bad, error):
    x, mask, _ = _data()
    for m in (seqnorm.LayerNorm(D), seqnorm.RMSNorm(D)):
        with pytest.raises(error, match="padding_mask"):
            m(x, padding_mask=bad(mask))
    with pytest.raises(ValueError, match="lengths"):
        seqnorm.LayerNorm(D)(x, lengths=torch.tensor([T + 1, 1, 1]))
    with pytest.raises(ValueError, match="either padding_mask or lengths"):
        seqnorm.LayerNorm(D)(x, padding_mask=mask, lengths=torch.tensor([1, 1, 1]))


def test_a_mask_changed_in_place_is_read_again():
    x, mask, _ = _data()
    x = torch.nan_to_num(x)
    ln = seqnorm.LayerNorm(D)
    mask = mask.clone()
    first = ln(x, padding_mask=mask)
    info = masks.host_rows(mask)
    assert masks.host_rows(mask) is info                 # kept for the same mask object and version
    mask[0, 1] = True                                    # in place: the version counter moves
    assert masks.host_rows(mask) is not info
    second = ln(x, padding_mask=mask)
    assert torch.all(second[0, 1] == 0) and not torch.all(first[0, 1] == 0)
    assert torch.equal(second, _general(ln, x, padding_mask=mask))
    base = torch.zeros(B, T + 1, dtype=torch.bool)       # a change through the tensor a mask is a view of
    view = base[:, :T]
    ln(x, padding_mask=view)
    base[2, 0] = True
    assert torch.all(ln(x, padding_mask=view)[2, 0] == 0)


def test_another_mask_of_the_same_shape_is_not_confused_with_the_cached_one():
    _, mask, _ = _data()
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(5))   # finite: every row may be real
    ln, bn = seqnorm.LayerNorm(D), seqnorm.SeqBatchNorm(D).train()
    other = torch.zeros_like(mask)
    other[:, 0] = True
    for a, b in ((mask, other), (other, mask), (mask, mask.clone())):
        assert torch.equal(ln(x, padding_mask=a), _general(ln, x, padding_mask=a))
        assert torch.equal(ln(x, padding_mask=b), _general(ln, x, padding_mask=b))
        assert torch.all(bn(x, padding_mask=b)[b] == 0)
    assert masks.host_rows(mask) is not masks.host_rows(other)
    # many masks in turn (more than are kept): each read right
    for k in range(masks._HOST_ROWS_KEPT + 3):
        m = torch.zeros_like(mask)
        m[:, T - 1 - k % T:] = True
        assert torch.equal(ln(x, padding_mask=m), _general(ln, x, padding_mask=m))


def test_lengths_changed_in_place_give_a_new_mask():
    x, _, lengths = _data()
    x = torch.nan_to_num(x)
    ln = seqnorm.LayerNorm(D)
    lengths = lengths.clone()
    ln(x, lengths=lengths)
    lengths[0] = 2
    y = ln(x, lengths=lengths)
    assert torch.all(y[0, 2:] == 0) and not torch.all(y[0, 1] == 0)
    assert torch.equal(y, _general(ln, x, lengths=lengths))


def test_inference_tensors_have_no_version_counter_and_are_not_cached():
    x, mask, lengths = _data()
    ln, bn = seqnorm.LayerNorm(D), seqnorm.SeqBatchNorm(D)
    with torch.inference_mode():
        im, il, ix = mask.clone(), lengths.clone(), x.clone()
        for _ in range(2):
            y = ln(ix, padding_mask=im)
            assert torch.all(y[im] == 0) and torch.isfinite(y).all()
            assert torch.equal(ln(ix, lengths=il), y)
            assert torch.equal(F.layer_norm(ix, D, lengths=il), y)          # the general path's caches too
            bn.train()(ix, padding_mask=im)
            assert torch.all(bn.eval()(ix, padding_mask=im)[im] == 0)
    assert bn.num_batches_tracked.item() == 2


def test_context_mask_is_dropped_when_a_layer_records_new_lengths():
    x, _, lengths = _data()
    x = torch.nan_to_num(x)
    ln = seqnorm.LayerNorm(D)
    with seqnorm.padding(lengths=lengths) as ctx:
        ln(x)
        ctx.record(T, torch.tensor([1, 1, 1]))          # what a rate-changing layer does
        y = ln(x)
    assert torch.all(y[:, 1:] == 0) and not torch.all(y[:, 0] == 0)


# ---------------------------------------------------------------------------
# SeqBatchNorm training
# ---------------------------------------------------------------------------


def _sbn_pair(dtype, momentum=0.1):
    torch.manual_seed(3)
    a = seqnorm.SeqBatchNorm(D, momentum=momentum, dtype=dtype).train()
    with torch.no_grad():
        a.weight.copy_(torch.randn(D, dtype=dtype))
        a.bias.copy_(torch.randn(D, dtype=dtype))

    class General(seqnorm.SeqBatchNorm):     # a subclass takes the general path
        pass

    b = General(D, momentum=momentum, dtype=dtype).train()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("how", ["padding_mask", "lengths", "context", "none"])
def test_seq_batch_norm_training_matches_the_sync_free_path(dtype, momentum, how):
    """Against the general path under the policy a GPU gets (the masked-moments
    autograd Function and the device-side select): values, gradients and running
    statistics over three steps, a 1e4 offset included."""
    x, mask, lengths = _data(dtype)
    x = x * 3 + 1e4
    a, b = _sbn_pair(dtype, momentum)
    kw = {"padding_mask": dict(padding_mask=mask), "lengths": dict(lengths=lengths)}.get(how, {})
    pad = mask if how != "none" else torch.zeros_like(mask)
    if how == "none":
        x = torch.nan_to_num(x, posinf=0.0)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for step in range(3):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        if how == "context":
            with seqnorm.padding(lengths=lengths):
                ya = a(xa)
        else:
            ya = a(xa, **kw)
        real = running.sync_free
        try:
            running.sync_free = lambda t: True
            yb = b(xb, padding_mask=pad)
        finally:
            running.sync_free = real
        assert torch.all(ya[pad] == 0)
        torch.testing.assert_close(ya, yb, **tol)
        ga = _grads(ya, [xa, a.weight, a.bias], seed=step)
        gb = _grads(yb, [xb, b.weight, b.bias], seed=step)
        for u, v in zip(ga, gb):
            assert torch.isfinite(u).all()
            torch.testing.assert_close(u, v, rtol=1e-3 if dtype == torch.float32 else 1e-9,
                                       atol=1e-3 if dtype == torch.float32 else 1e-9)
        assert torch.all(ga[0][pad] == 0)
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=0)
        assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == step + 1


def test_seq_batch_norm_training_fast_path_is_taken_and_deterministic():
    x, mask, _ = _data()
    a, _ = _sbn_pair(torch.float32)
    args = (a.running_mean, a.running_var, a.num_batches_tracked, a.weight, a.bias, a.momentum, a.eps)
    assert F._host_batch_norm_train(x, *args, mask, None) is not None
    one = torch.ones_like(mask)
    one[0, 0] = False                                  # one real token: the general path raises
    assert F._host_batch_norm_train(x, *args, one, None) is None
    with pytest.raises(ValueError, match="more than 1 real token"):
        a(x, padding_mask=one)
    a.momentum = 2.0                                   # set after construction: still checked
    with pytest.raises(ValueError, match="momentum"):
        a(x, padding_mask=mask)
    runs = []
    for _ in range(2):
        m, _ = _sbn_pair(torch.float32)
        xg = x.clone().requires_grad_()
        y = m(xg, padding_mask=mask)
        runs.append((y, *_grads(y, [xg, m.weight]), m.running_mean.clone(), m.running_var.clone()))
    for u, v in zip(*runs):
        assert torch.equal(u, v)


def test_seq_batch_norm_training_skips_non_finite_statistics_with_a_warning():
    x, mask, _ = _data()
    a, _ = _sbn_pair(torch.float32)
    a(x, padding_mask=mask)
    before = [t.clone() for t in (a.running_mean, a.running_var, a.num_batches_tracked)]
    x[0, 0, 3] = float("nan")                          # at a real token
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a(x, padding_mask=mask)
    assert any(issubclass(w.category, F.NonFiniteStatisticsWarning) for w in caught)
    for t, u in zip(before, (a.running_mean, a.running_var, a.num_batches_tracked)):
        assert torch.equal(t, u)


def test_seq_batch_norm_large_offset_statistics_stay_accurate():
    """The shift by the first real row keeps float32 statistics at a 1e4 offset
    within float32's reach of the float64 ones (as test_functional's check)."""
    gen = torch.Generator().manual_seed(31)
    x32 = 1e4 + torch.randn(8, 64, 96, generator=gen)
    mask = torch.rand(8, 64, generator=gen) < 0.2
    bn = seqnorm.SeqBatchNorm(96, momentum=1.0).train()
    y = bn(x32, padding_mask=mask)
    real = x32.double()[~mask]
    torch.testing.assert_close(bn.running_mean.double(), real.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(bn.running_var.double(), real.var(0), rtol=1e-3, atol=0)
    ref = (real - real.mean(0)) / torch.sqrt(real.var(0, unbiased=False) + 1e-5)
    assert (y.double()[~mask] - ref).abs().max() < 1e-3
