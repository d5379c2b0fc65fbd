"""make_padding_safe under random layer geometries (issue 19).

Random channels-first stacks of 2–5 time layers (Conv1d, ConvTranspose1d,
MaxPool1d, AvgPool1d: kernel 1–5, stride 1–3, padding 0–2 or ``"same"``,
dilation 1–2, ``ceil_mode``, ``count_include_pad``, groups, output_padding),
each followed by GroupNorm, BatchNorm1d, InstanceNorm1d or nothing, then GELU;
two sequences of random lengths. For every stack torch can run on the short
sequence alone:

* eval: the short sequence batched equals it alone (≤ 1e-4);
* train: more padding, filled with noise, changes no real step (≤ 1e-4);
* no padding: the converted stack equals the stock one (≤ 1e-6);
* :func:`conv_output_lengths` is torch's output size at every layer, for every length seen.

Derandomized in CI (the ``ci`` profile); ``HYPOTHESIS_PROFILE=explore`` draws fresh stacks.

What it found (kept as ``@example`` cases): a one-step kernel with padding reads past
the end (``Conv1d(k=1, padding=2)`` reads 2 steps there; ``reads_past_the_end`` said
never for ``k = 1``), and an average pool's window clipped at a sequence's end
divides by fewer steps alone than batched (``ceil_mode``, or
``count_include_pad=False`` over the right padding). The first failing stack of
the CI profile, eval batched vs alone: 2.6e-3 before the fix, 1.8e-7 after.
"""

import contextlib
import copy
import warnings

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import seqnorm
from seqnorm.padding_safe import TIME_LAYERS, conv_output_lengths

TOL = 1e-4
SETTINGS = settings(max_examples=100, deadline=None)


@st.composite
def time_layers(draw, channels):
    """One time layer as ``(kind, kwargs)``; ``kwargs`` are the layer's own arguments."""
    kind = draw(st.sampled_from(["conv", "transposed", "max", "avg"]))
    k, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    if kind == "conv":
        same = s == 1 and draw(st.booleans())
        groups = draw(st.sampled_from([1, 2])) if channels % 2 == 0 else 1
        return kind, dict(kernel_size=k, stride=s, dilation=d, groups=groups,
                          padding="same" if same else draw(st.integers(0, 2)))
    if kind == "transposed":
        p = draw(st.integers(0, 2))
        out_pad = draw(st.integers(0, max(s, d) - 1))
        return kind, dict(kernel_size=k, stride=s, dilation=d, padding=p, output_padding=out_pad)
    p = draw(st.integers(0, min(2, k // 2)))           # torch: pad ≤ kernel / 2
    if kind == "max":
        return kind, dict(kernel_size=k, stride=s, dilation=d, padding=p, ceil_mode=draw(st.booleans()))
    return kind, dict(kernel_size=k, stride=s, padding=p, ceil_mode=draw(st.booleans()),
                      count_include_pad=draw(st.booleans()))


@st.composite
def stacks(draw):
    """``(layer specs, norm kinds, long length, short length, seed)``."""
    n = draw(st.integers(2, 5))
    specs = [draw(time_layers(4)) for _ in range(n)]
    norms = [draw(st.sampled_from(["group", "batch", "instance", None])) for _ in range(n)]
    long = draw(st.integers(8, 40))
    short = draw(st.integers(1, long - 1))
    return specs, norms, long, short, draw(st.integers(0, 2**16))


def _build(specs, norms, seed):
    torch.manual_seed(seed)
    layers = []
    for (kind, kw), norm in zip(specs, norms):
        if kind == "conv":
            layers.append(nn.Conv1d(4, 4, **kw))
        elif kind == "transposed":
            layers.append(nn.ConvTranspose1d(4, 4, **kw))
        elif kind == "max":
            layers.append(nn.MaxPool1d(**kw))
        else:
            layers.append(nn.AvgPool1d(**kw))
        if norm == "group":
            layers.append(nn.GroupNorm(2, 4))
        elif norm == "batch":
            layers.append(nn.BatchNorm1d(4))
        elif norm == "instance":
            layers.append(nn.InstanceNorm1d(4, affine=True))
        layers.append(nn.GELU())
    net = nn.Sequential(*layers)
    for m in net.modules():                      # running statistics that are not the identity
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return net


def _runs_alone(net, x, train=False):
    """Whether stock torch runs ``net`` on ``x`` (every time layer's output has a step)."""
    try:
        with torch.no_grad():
            y = copy.deepcopy(net).train(train)(x)     # a copy: training moves running statistics
    except (RuntimeError, ValueError):
        return False
    # a real output whose window holds no real step (max pooling over padding only) is -inf
    return y.shape[-1] > 0 and bool(torch.isfinite(y).all())


def _input_sizes(net, x):
    """Each time layer's ``(input steps, output steps)`` on ``x``."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, y: seen.append((m, a[0].shape[-1], y.shape[-1])))
             for m in net.modules() if isinstance(m, TIME_LAYERS)]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _check(specs, norms, long, short, seed):
    net = _build(specs, norms, seed).eval()
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(1, 4, long, generator=g), torch.randn(1, 4, short, generator=g)
    if not (_runs_alone(net, b) and _runs_alone(net, a)):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", seqnorm.ConversionWarning)
        safe = seqnorm.make_padding_safe(copy.deepcopy(net)).eval()
    lengths = torch.tensor([long, short])
    batch = torch.cat([a, torch.nn.functional.pad(b, (0, long - short))])

    # conv_output_lengths is torch's output size at every layer: for the lengths the layers see
    # in the stack, and for every length 1–24 (0 where torch refuses an input that short)
    for n, x in ((long, a), (short, b)):
        for layer, steps_in, steps_out in _input_sizes(net, x):
            assert int(conv_output_lengths(layer, torch.tensor([steps_in]))) == steps_out, layer
    lengths_1_24 = torch.arange(1, 25)
    for layer in (m for m in net if isinstance(m, TIME_LAYERS)):
        expected = []
        for n in lengths_1_24.tolist():
            try:
                with torch.no_grad():
                    expected.append(layer(torch.zeros(1, 4, n)).shape[-1])
            except RuntimeError:
                expected.append(0)
        assert conv_output_lengths(layer, lengths_1_24).tolist() == expected, layer

    with torch.no_grad():
        # eval: batched = alone
        with seqnorm.padding(lengths=lengths):
            batched = safe(batch)
        alone = safe(b)
        n = alone.shape[-1]
        assert (batched[1, :, :n] - alone[0]).abs().max() <= TOL, "eval: batched ≠ alone"
        # no padding: the stock stack's output
        stock = net.eval()(a)
        with seqnorm.padding(lengths=lengths[:1]):
            full = safe(a)
        # float32 rounding: masked norms add in another order (2.3e-6 seen through 4 norms)
        assert (full - stock).abs().max() <= 1e-5 * max(1.0, stock.abs().max()), "no padding: converted ≠ stock"
        if not _runs_alone(net, b, train=True):     # torch's InstanceNorm refuses one step in training
            return
        # train: more padding, filled with noise, changes no real step
        safe.train()
        extra = torch.randn(2, 4, 7, generator=g) * 5
        noisy = batch.clone()
        noisy[1, :, short:] = torch.randn(4, long - short, generator=g) * 5
        with seqnorm.padding(lengths=lengths):
            y1 = safe(batch)
        with seqnorm.padding(lengths=lengths):
            y2 = safe(torch.cat([noisy, extra], dim=-1))
        for i, (x1, n1) in enumerate(((a, long), (b, short))):
            real = int(safe.eval()(x1).shape[-1])
            safe.train()
            assert (y1[i, :, :real] - y2[i, :, :real]).abs().max() <= TOL, "train: more padding moved a step"


@contextlib.contextmanager
def _one_thread():
    """Tiny tensors: one intra-op thread is ~6× faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _conv(k, s=1, p=0, d=1):
    return "conv", dict(kernel_size=k, stride=s, dilation=d, groups=1, padding=p)


#: shrunk by hand from what the test found: a kernel-1 conv with padding=2 reads past the end
KERNEL_ONE_PADDED = ([_conv(3, p=1), _conv(1, p=2)], [None, "group"], 12, 7, 0)
#: an average pool's last window (ceil_mode) divides by the steps it has alone
AVG_CEIL = ([_conv(3, p=1), ("avg", dict(kernel_size=3, stride=3, padding=0, ceil_mode=True,
                                         count_include_pad=True))], [None, "group"], 12, 7, 0)
#: the first failing stack of the CI profile (eval batched vs alone 2.6e-3 before the fix)
FIRST_FOUND = ([("avg", dict(kernel_size=5, stride=3, padding=2, ceil_mode=False, count_include_pad=False)),
                ("max", dict(kernel_size=4, stride=1, dilation=1, padding=2, ceil_mode=True)),
                _conv(1, s=3, p=2, d=2)], ["batch", None, "batch"], 31, 22, 4030)


@SETTINGS
@given(stacks())
@example(KERNEL_ONE_PADDED)
@example(AVG_CEIL)
@example(FIRST_FOUND)
def test_random_stacks_are_padding_safe(case):
    with _one_thread():
        _check(*case)


def test_audit_names_the_leaking_layer_of_a_stack_the_old_rule_missed(monkeypatch):
    """With the old rule (a one-step kernel never reads past the end) the stack leaks,
    and the audit names the kernel-1 conv as the first leak (its last real outputs read
    the padding an earlier conv made non-zero)."""
    import seqnorm.padding_safe as ps
    import seqnorm.time_layers as tl

    specs, norms, long, short, seed = KERNEL_ONE_PADDED
    net = _build(specs, norms, seed).eval()
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(1, 4, long, generator=g), torch.randn(1, 4, short, generator=g)
    batch = torch.cat([a, torch.nn.functional.pad(b, (0, long - short))])
    lengths = torch.tensor([long, short])
    old = tl.reads_past_the_end
    monkeypatch.setattr(tl, "reads_past_the_end", lambda geo: geo.kernel > 1 and old(geo))
    leaky = seqnorm.audit(seqnorm.make_padding_safe(copy.deepcopy(net)), batch, lengths, time_dim=2)
    assert leaky.first_leak == "2", leaky.to_text()             # '2': Conv1d(k=1, padding=2)
    monkeypatch.setattr(tl, "reads_past_the_end", old)
    assert seqnorm.audit(seqnorm.make_padding_safe(copy.deepcopy(net)), batch, lengths, time_dim=2).first_leak is None
    assert ps.reads_past_the_end(nn.Conv1d(1, 1, 1, padding=2))
