"""make_padding_safe: batched = alone, and padding never matters, on models we do not edit.

The HF speech models are built from small configs (random weights, nothing
downloaded) with dropout, LayerDrop and SpecAugment off. Every property is
checked on the converted model *and* shown to fail on the unconverted one.
"""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import seqnorm
from seqnorm.padding_safe import conv_output_lengths

transformers = pytest.importorskip("transformers")   # a test dependency (.ci/run installs it)

from seqnorm import hf  # noqa: E402

HF_MODELS = list(hf.SPEECH_MODELS)     # wav2vec2, hubert, wav2vec2-conformer, data2vec-audio
LONG, SHORT = 1600, 1000     # samples: 79 and 49 frames at the 20× stride of hf.SMALL_SPEECH
TOL = 1e-4


def _model(name, seed=0):
    return hf.build(name, seed=seed)


def _frames(model, samples):
    return int(hf.frames(model, samples))


def _forward(model, batch, lengths, safe):
    """Last hidden state; with ``safe`` inside seqnorm.padding (the usage the README shows)."""
    steps = torch.arange(batch.shape[1])
    attention_mask = (steps[None, :] < lengths[:, None]).long()
    if safe:
        with seqnorm.padding(lengths=lengths):
            return model(batch, attention_mask=attention_mask).last_hidden_state
    return model(batch, attention_mask=attention_mask).last_hidden_state


def _utterances(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LONG, generator=g), torch.randn(SHORT, generator=g)


def _padded(seqs, total, fill_seed=None):
    """A (B, total) batch; padding zeros, or random values with ``fill_seed``."""
    if fill_seed is None:
        batch = torch.zeros(len(seqs), total)
    else:
        batch = torch.randn(len(seqs), total, generator=torch.Generator().manual_seed(fill_seed)) * 3
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    return batch, torch.tensor([len(s) for s in seqs])


def _batched_vs_alone(model, safe):
    long, short = _utterances()
    batch, lengths = _padded([long, short], LONG)
    with torch.no_grad():
        batched = _forward(model, batch, lengths, safe)
        alone = _forward(model, short[None], torch.tensor([SHORT]), safe)
    n = _frames(model, SHORT)
    return (batched[1, :n] - alone[0, :n]).abs().max().item()


def _more_padding(model, safe):
    """Largest change at real frames when the batch gets 800 more samples of random padding."""
    long, short = _utterances(2)
    a, lengths = _padded([long, short], LONG)
    b, _ = _padded([long, short], LONG + 800, fill_seed=3)
    ya = _forward(model, a, lengths, safe)
    yb = _forward(model, b, lengths, safe)
    return max((ya[i, :_frames(model, int(n))] - yb[i, :_frames(model, int(n))]).abs().max().item()
               for i, n in enumerate(lengths))


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_model_batched_equals_alone_in_eval(name):
    model = _model(name).eval()
    leak = _batched_vs_alone(model, safe=False)
    assert leak > 1e-2, f"the unconverted {name} should leak padding (the test's teeth), got {leak}"
    safe = seqnorm.make_padding_safe(copy.deepcopy(model))
    assert _batched_vs_alone(safe, safe=True) <= TOL


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_model_more_padding_changes_no_real_frame(name, train):
    model = _model(name).train(train)
    with torch.no_grad():
        leak = _more_padding(copy.deepcopy(model), safe=False)
        assert leak > 1e-2, f"the unconverted {name} should see its padding (the test's teeth), got {leak}"
        safe = seqnorm.make_padding_safe(copy.deepcopy(model))
        assert _more_padding(safe, safe=True) <= TOL


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_model_without_padding_is_unchanged(name):
    model = _model(name).eval()
    long, _ = _utterances()
    x = torch.stack([long, long.flip(0)])
    full = torch.tensor([LONG, LONG])
    with torch.no_grad():
        before = _forward(model, x, full, safe=False)
        safe = seqnorm.make_padding_safe(copy.deepcopy(model))
        plain = _forward(safe, x, full, safe=False)            # no context: the hooks do nothing
        in_context = _forward(safe, x, full, safe=True)        # full lengths: nothing is padding
    assert (plain - before).abs().max() <= 1e-5
    assert (in_context - before).abs().max() <= 1e-5
    norms = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.InstanceNorm1d, seqnorm.SeqBatchNorm)
    swapped = {type(m).__module__ for m in safe.modules() if isinstance(m, norms)}
    assert swapped == {"seqnorm.modules"}                     # every norm is seqnorm's


def test_hf_model_train_step_runs_and_updates_masked_statistics():
    model = seqnorm.make_padding_safe(_model("hubert")).train()
    long, short = _utterances()
    batch, lengths = _padded([long, short], LONG, fill_seed=5)
    out = _forward(model, batch, lengths, safe=True)
    out.sum().backward()
    bn = model.encoder.pos_conv_embed.batch_norm
    assert isinstance(bn, seqnorm.SeqBatchNorm) and bn.channels_first
    assert int(bn.num_batches_tracked) == 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------
# Plain conv stacks: every geometry the lengths pass through
# ---------------------------------------------------------------------------


def _stack():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 8, 5, stride=2, padding=2), nn.BatchNorm1d(8), nn.GELU(),
        nn.Conv1d(8, 8, 3, dilation=2, padding="same"), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.MaxPool1d(3, stride=2, padding=1), nn.InstanceNorm1d(8, affine=True),
        nn.AvgPool1d(2), nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1), nn.Tanh(),
        nn.Conv1d(4, 4, 4, padding=2),                   # even kernel: T → T + 1
    )


def test_conv_stack_batched_equals_alone_and_padding_never_matters():
    net = _stack()
    torch.manual_seed(1)
    seqs = [torch.randn(3, 57), torch.randn(3, 30), torch.randn(3, 41)]
    batch = torch.randn(3, 3, 57) * 10                       # garbage padding
    for i, s in enumerate(seqs):
        batch[i, :, : s.shape[1]] = s
    lengths = torch.tensor([s.shape[1] for s in seqs])
    with torch.no_grad():
        leaky = net.eval()(batch)
        leaky_alone = net(seqs[1][None])
        safe = seqnorm.make_padding_safe(copy.deepcopy(net)).eval()
        with seqnorm.padding(lengths=lengths):
            batched = safe(batch)
        alone = [safe(s[None]) for s in seqs]
    for i, a in enumerate(alone):
        torch.testing.assert_close(batched[i, :, : a.shape[-1]], a[0], atol=1e-5, rtol=1e-5)
    n = leaky_alone.shape[-1]
    assert (leaky[1, :, :n] - leaky_alone[0]).abs().max() > 1e-2     # teeth


@pytest.mark.parametrize("layer", [
    nn.Conv1d(2, 2, 5, stride=3, padding=2, dilation=2), nn.Conv1d(2, 2, 4, padding="same"),
    nn.Conv1d(2, 2, 3, padding="valid"), nn.ConvTranspose1d(2, 2, 5, stride=3, padding=1, output_padding=2),
    nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True), nn.AvgPool1d(4, stride=3, ceil_mode=True),
    nn.MaxPool1d(2, dilation=3), nn.AvgPool1d(3, padding=1),
], ids=lambda m: repr(m))
def test_output_lengths_are_torchs_output_size_for_each_length(layer):
    lengths = torch.arange(0, 40)
    expected = []
    for n in lengths.tolist():
        try:
            expected.append(layer(torch.zeros(1, 2, n)).shape[-1] if n else 0)
        except RuntimeError:   # torch refuses an input too short for the kernel
            expected.append(0)
    assert conv_output_lengths(layer, lengths).tolist() == expected


def test_errors_and_fall_backs_name_the_layer():
    """What torch refuses too raises, naming the layer; what seqnorm cannot follow in a model
    that runs (issue 17: do no harm) acts as torch's module, with one warning naming the layer."""
    def net():
        return seqnorm.make_padding_safe(nn.Sequential(nn.Conv1d(1, 4, 10, stride=5), nn.GroupNorm(2, 4),
                                                       nn.Conv1d(4, 4, 3)))
    x = torch.randn(2, 1, 100)
    with pytest.warns(seqnorm.ConversionWarning, match=r"layer '2' \(Conv1d\): sequence 1 has 1 steps, too few "
                                                       r"for kernel 3"):
        with seqnorm.padding(lengths=torch.tensor([100, 12])):      # 12 samples → 1 frame → nothing
            net()(x)
    stock = net()
    with torch.no_grad():
        expected = stock(x)
        with pytest.warns(seqnorm.ConversionWarning, match=r"layer '0' \(Conv1d\): lengths up to 120 but the "
                                                           r"layer's input has only 100 time steps"):
            with seqnorm.padding(lengths=torch.tensor([120, 50])):
                got = stock(x)
    torch.testing.assert_close(got, expected)                     # torch's behaviour, unmasked
    with pytest.raises(ValueError, match=r"layer '0' \(Conv1d\): expects 1 input channels"):
        with seqnorm.padding(lengths=torch.tensor([100, 50])):
            net()(torch.randn(2, 3, 100))
    bad = seqnorm.make_padding_safe(nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(0, 1), nn.Unflatten(0, (2, 4)),
                                                  nn.GroupNorm(2, 6)))
    with pytest.raises(ValueError, match=r"layer '3' \(GroupNorm\): expects 6 channels"):
        with seqnorm.padding(lengths=torch.tensor([100, 50])):
            bad(torch.randn(2, 1, 100))
    odd = seqnorm.make_padding_safe(nn.Sequential(nn.Conv1d(1, 4, 3), nn.Upsample(scale_factor=2),
                                                  nn.GroupNorm(2, 4)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with seqnorm.padding(lengths=torch.tensor([100, 50])):
                y = odd(torch.randn(2, 1, 100))
    said = [str(w.message) for w in caught if issubclass(w.category, seqnorm.ConversionWarning)]
    assert len(said) == 1, said                                     # one warning per layer
    assert re.search(r"layer '2' \(GroupNorm\): no sequence lengths are known at 196 time steps \(known at "
                     r"98, 100\).*acts as torch's module does", said[0]), said[0]
    assert y.shape == (2, 4, 196)
    assert seqnorm.padding_safe.unfollowed(odd) == {"2": said[0].split(": ", 2)[2].split("; it acts")[0]}


def test_padding_mask_works_as_lengths_and_must_be_at_the_end_for_rate_changes():
    net = seqnorm.make_padding_safe(_stack()).eval()
    x = torch.randn(2, 3, 40)
    lengths = torch.tensor([40, 23])
    mask = torch.arange(40)[None, :] >= lengths[:, None]
    with torch.no_grad():
        with seqnorm.padding(lengths=lengths):
            a = net(x)
        with seqnorm.padding(mask):
            b = net(x)
    torch.testing.assert_close(a, b)
    holes = mask.clone()
    holes[0, 5] = True
    with pytest.raises(ValueError, match="padding at the end of each sequence"):
        with seqnorm.padding(holes):
            net(x)


def test_idempotent_and_warns_about_padding_it_cannot_follow():
    net = _stack()
    safe = seqnorm.make_padding_safe(net)
    hooks = sum(len(m._forward_pre_hooks) for m in safe.modules())
    assert seqnorm.make_padding_safe(safe) is safe
    assert sum(len(m._forward_pre_hooks) for m in safe.modules()) == hooks
    # (a Conv1d's reflect padding is followed since issue 28, tests/test_codecs.py; a Conv2d's is not)
    with pytest.warns(seqnorm.ConversionWarning, match=r"layer '0' \(Conv2d\): padding_mode='reflect'"):
        seqnorm.make_padding_safe(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seqnorm.make_padding_safe(_stack())               # nothing to warn about there
    with pytest.raises(ValueError, match="pass the model that contains the norm"):
        seqnorm.make_padding_safe(nn.GroupNorm(1, 2))


@pytest.mark.parametrize("layer", [
    nn.Conv1d(1, 1, 5, stride=3, dilation=2), nn.Conv1d(1, 1, 4, stride=2), nn.MaxPool1d(3, stride=2),
    nn.AvgPool1d(4, stride=3), nn.Conv1d(1, 1, 3, padding=1), nn.Conv1d(1, 1, 4, padding="same"),
    nn.MaxPool1d(3, stride=2, ceil_mode=True), nn.ConvTranspose1d(1, 1, 3, stride=2), nn.Conv1d(1, 1, 1),
], ids=lambda m: repr(m))
def test_reads_past_the_end_is_exactly_whether_a_real_output_sees_a_pad(layer):
    """Brute force: put NaN right after a sequence of every length and see whether a real output moves."""
    from seqnorm.padding_safe import reads_past_the_end

    seen = False
    for n in range(1, 30):
        x = torch.randn(1, 1, n + 12)
        x[..., n:] = float("nan")
        with torch.no_grad():
            y = layer(x)
        real = int(conv_output_lengths(layer, torch.tensor([n])))
        seen |= bool(torch.isnan(y[..., :real]).any())
    assert reads_past_the_end(layer) == seen
