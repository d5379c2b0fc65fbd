"""make_padding_safe masks attention keys past each sequence's end (seqnorm.attention_safe).

Models whose own attention mask is wrong (Moonshine slices the waveform mask,
SEW max-pools it to its squeezed rate) become batched = alone; every such test
also runs with ``attention=False``, which must leave the leak (teeth). Models
whose masks were right give the same outputs with and without the key masks.
"""

import warnings

import pytest
import torch
from torch import nn

import seqnorm
from seqnorm.attention_safe import (AttentionWarning, attention_report, combine_key_mask, hook_attention,
                                    key_mask)

transformers = pytest.importorskip("transformers")   # a test dependency (.ci/run installs it)

from seqnorm import hf  # noqa: E402

TOL = 1e-4
#: layers off the context's grid act as torch's, with a warning (make_padding_safe's own)
pytestmark = pytest.mark.filterwarnings("ignore::seqnorm.convert.ConversionWarning")
#: Moonshine at test size: conv front end of stride 384 (127/64, 7/3, 3/2), 2 + 2 layers of width 32
MOONSHINE = dict(hidden_size=32, intermediate_size=64, encoder_num_hidden_layers=2, decoder_num_hidden_layers=2,
                 encoder_num_attention_heads=2, decoder_num_attention_heads=2, encoder_num_key_value_heads=2,
                 decoder_num_key_value_heads=2, vocab_size=50)
#: SEW at test size; weights drawn 10× wider than HF's default (0.02) so the squeezed-rate leak is well
#: above rounding, as it is in a trained model (at 0.02 it is ~7e-6)
SEW = dict(hf.SMALL_SPEECH, squeeze_factor=2, initializer_range=0.2)


def _wave(long, short, seed=1):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(long, generator=g), torch.randn(short, generator=g)
    batch = torch.zeros(2, long)
    batch[0], batch[1, :short] = a, b
    return batch, torch.tensor([long, short]), b[None]


def _run(module, x, lengths, mask=True, **kwargs):
    if mask:
        kwargs["attention_mask"] = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad(), seqnorm.padding(lengths=lengths):
        return module(x, **kwargs)


def _safe(name, config, attention, **build):
    model = hf.build(name, config, **build)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return seqnorm.make_padding_safe(model, attention=attention)


def _batched_vs_alone(module, long, short, mask=True, out=lambda o: o.last_hidden_state, **kwargs):
    batch, lengths, alone = _wave(long, short)
    batched = out(_run(module, batch, lengths, mask, **kwargs))
    single = out(_run(module, alone, lengths[1:], mask, **{k: v[:1] for k, v in kwargs.items()}))
    n = single.shape[1]
    return (batched[1, :n] - single[0]).abs().max().item(), batched


# ---------------------------------------------------------------------------
# The mask arithmetic
# ---------------------------------------------------------------------------


def test_key_mask_keeps_every_key_of_an_empty_sequence():
    assert key_mask(torch.tensor([2, 0]), 3).tolist() == [[True, True, False], [True, True, True]]


@pytest.mark.parametrize("shape", [(2, 1, 3, 4), (2, 3, 4), (2, 4), (1, 1, 3, 4)])
def test_combine_bool_mask_keeps_its_structure(shape):
    keep = key_mask(torch.tensor([4, 2]), 4)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.3      # any structure (causal, window…)
    out = combine_key_mask(mask, keep)
    assert out.shape[-1] == 4 and out.dtype == torch.bool
    expect = mask & keep.reshape((2,) + (1,) * (mask.dim() - 2) + (4,))
    assert torch.equal(out, expect)
    assert torch.equal(out[0].expand_as(out[0]), mask[0].expand(out[0].shape))    # a full sequence: unchanged


def test_combine_float_mask_fills_with_the_minimum_without_overflow():
    low = torch.finfo(torch.float32).min
    mask = torch.tensor([[[[0.0, -1.0, low, 0.0]]]]).expand(2, 1, 1, 4)
    out = combine_key_mask(mask, key_mask(torch.tensor([4, 2]), 4))
    assert out[0].tolist() == mask[0].tolist()                                       # already right: unchanged
    assert out[1, 0, 0].tolist() == [0.0, -1.0, low, low]                            # not -inf: low + low overflows
    assert torch.isfinite(out).all()


def test_combine_integer_mask_and_padding_true_mask():
    keep = key_mask(torch.tensor([3, 1]), 3)
    assert combine_key_mask(torch.ones(2, 3, dtype=torch.long), keep).tolist() == [[1, 1, 1], [1, 0, 0]]
    kpm = torch.tensor([[False, False, True], [False, False, False]])                # True = padding (torch MHA)
    assert combine_key_mask(kpm, keep, padding_true=True).tolist() == [[False, False, True], [False, True, True]]


def test_combine_mask_longer_than_the_keys_and_unalignable():
    keep = key_mask(torch.tensor([2, 1]), 2)
    longer = combine_key_mask(torch.ones(2, 1, 1, 5, dtype=torch.bool), keep)
    assert longer[:, 0, 0].tolist() == [[True, True, True, True, True], [True, False, True, True, True]]
    assert combine_key_mask(torch.ones(3, 2, dtype=torch.bool), keep) is None            # batch 3 vs 2
    assert combine_key_mask(torch.ones(2, 1, dtype=torch.bool), keep) is None            # fewer keys


class TinyAttention(nn.Module):
    """An HF-style attention module that records the mask it gets (its forward hands the mask to
    ``attention_interface``, as HF's modules do)."""

    def __init__(self, impl, is_causal=False):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": impl})()
        self.is_causal, self.seen = is_causal, []

    def forward(self, hidden_states, attention_mask=None):
        attention_interface = self.seen.append
        attention_interface(attention_mask)
        return hidden_states


def _tiny(impl, mask=None, positional=False, is_causal=False):
    attn = TinyAttention(impl, is_causal)
    seqnorm.make_padding_safe(attn)
    x = torch.randn(2, 4, 3)
    with seqnorm.padding(lengths=torch.tensor([4, 2])):
        attn(x, mask) if positional else attn(x, attention_mask=mask)
    return attn.seen[0]


def test_a_module_called_without_a_mask_gets_its_implementations_format():
    keep = [[True] * 4, [True, True, False, False]]
    assert _tiny("sdpa").dtype == torch.bool and _tiny("sdpa")[:, 0, 0].tolist() == keep
    eager = _tiny("eager")
    assert eager.dtype == torch.float32 and (eager[:, 0, 0] == 0).tolist() == keep
    causal = _tiny("sdpa", is_causal=True)                        # is_causal is dropped once a mask is given
    assert causal.shape == (2, 1, 4, 4) and torch.equal(causal[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(causal[1, 0], torch.ones(4, 4, dtype=torch.bool).tril() & torch.tensor(keep[1]))


def test_a_positional_mask_is_combined_and_a_bool_mask_under_eager_is_left():
    window = torch.ones(4, 4, dtype=torch.bool).triu(-1).tril(1)[None, None].expand(2, 1, 4, 4)
    got = _tiny("sdpa", window, positional=True)
    assert torch.equal(got[0], window[0]) and not got[1, 0, :, 2:].any()        # window kept, keys 2, 3 dropped
    with pytest.warns(AttentionWarning, match="adds the bool mask"):
        assert _tiny("eager", window) is window                                 # HF would add it as 0/1


# ---------------------------------------------------------------------------
# Models whose own mask is wrong: fixed, and not without attention fixing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_moonshine_encoder_batched_equals_alone(impl):
    """Moonshine slices the waveform mask every 384th sample: the short utterance's last frames,
    whose conv windows run past its end, count as keys batched."""
    errs = {}
    for attention in (True, False):
        model = _safe("moonshine", dict(MOONSHINE, attn_implementation=impl), attention)
        errs[attention], _ = _batched_vs_alone(model.encoder, 16000, 9000)
    assert errs[True] <= TOL, errs
    assert errs[False] > 1e-2, errs                       # teeth: the model's own mask leaks


def test_moonshine_encoder_decoder_batched_equals_alone():
    """The full model: the encoder's outputs, and the decoder's, whose cross-attention takes the
    encoder's (wrong) output mask — it gets the encoder's key lengths at the encoder rate."""
    tokens = torch.tensor([[1, 5, 7]]).expand(2, 3)
    res = {}
    for attention in (True, False):
        model = _safe("moonshine", MOONSHINE, attention)
        enc, _ = _batched_vs_alone(model, 16000, 9000, out=lambda o: o.encoder_last_hidden_state,
                                   decoder_input_ids=tokens)
        dec, _ = _batched_vs_alone(model, 16000, 9000, decoder_input_ids=tokens)
        res[attention] = (enc, dec)
    assert max(res[True]) <= TOL, res
    assert min(res[False]) > 1e-2, res


def test_decoder_self_attention_is_left_alone_at_a_frame_count():
    """The decoder's self-attention (its keys are tokens) is not masked, and its norms stay torch's,
    even with as many tokens as the batch has encoder frames (40): a token count that matches a
    frame rate is not that rate. (Before decoders were left alone, make_padding_safe gave the
    decoder's norms the frame lengths and zeroed the short utterance's tokens past its frame count.)"""
    tokens = torch.randint(1, 50, (1, 40), generator=torch.Generator().manual_seed(0)).expand(2, 40)
    res = {}
    for attention in (True, False):
        model = _safe("moonshine", MOONSHINE, attention)
        assert all(type(m).__module__.startswith("torch") for m in model.decoder.modules()
                   if isinstance(m, (nn.LayerNorm, nn.RMSNorm)))                 # decoder norms not swapped
        res[attention], batched = _batched_vs_alone(model, 16000, 9000, decoder_input_ids=tokens)
        assert batched.shape[1] == 40 and (batched[1].abs().amax(-1) > 0).all()  # no token zeroed
        if attention:
            notes = "\n".join(attention_report(model))
            assert "decoder.layers.0.encoder_attn" in notes and "decoder self-attention" in notes
    assert res[True] <= TOL and res[False] > 1e-2, res


@pytest.mark.parametrize("name", ["sew", "sew-d"])
def test_squeezed_rate_batched_equals_alone(name):
    """SEW and SEW-D max-pool the mask to their squeezed rate: a window half real is a key batched;
    alone the sequence has ⌊49/2⌋ = 24 squeezed frames. SEW-D's mask is an integer 0/1 one."""
    config = SEW if name == "sew" else dict(hf.SMALL_CONFIGS["sew-d"], initializer_range=0.2)
    errs = {}
    for attention in (True, False):
        errs[attention], _ = _batched_vs_alone(_safe(name, config, attention), 1600, 1000)
    assert errs[True] <= TOL, errs
    assert errs[False] > 1e-2, errs


def test_a_model_called_without_a_mask_gets_one_from_the_lengths():
    """wav2vec2 (group-norm feature encoder) is meant to be called without attention_mask: the
    padded keys then count; the padding context's lengths mask them."""
    errs = {}
    for attention in (True, False):
        errs[attention], _ = _batched_vs_alone(_safe("wav2vec2", None, attention), 1600, 1000, mask=False)
    assert errs[True] <= TOL, errs
    assert errs[False] > 1e-3, errs


# ---------------------------------------------------------------------------
# Models whose masks were right: the key masks change nothing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wav2vec2", "hubert"])
def test_right_masks_are_unchanged(name):
    outs = {}
    for attention in (True, False):
        model = _safe(name, None, attention)
        err, outs[attention] = _batched_vs_alone(model, 1600, 1000)
        assert err <= TOL
        if attention:
            assert any("masked by make_padding_safe" in line for line in attention_report(model))   # hooks ran
    assert (outs[True] - outs[False]).abs().max().item() <= 1e-6


def _seamless_speech_encoder(attention):
    """Seamless M4T v2's speech encoder: chunked attention (chunks of 4 frames, one chunk of left
    context) over the input rate, then an adapter (a stride-2 conv and its own attention at the
    half rate). Depthwise kernel 1: its causal conv pads with F.pad, a rate make_padding_safe does
    not follow yet."""
    from transformers import SeamlessM4Tv2Config
    from transformers.models.seamless_m4t_v2.modeling_seamless_m4t_v2 import SeamlessM4Tv2SpeechEncoder

    cfg = SeamlessM4Tv2Config(hidden_size=32, speech_encoder_layers=2, speech_encoder_attention_heads=2,
                              speech_encoder_intermediate_size=64, feature_projection_input_dim=16,
                              conv_depthwise_kernel_size=1, adaptor_kernel_size=4, adaptor_stride=2,
                              num_adapter_layers=1, add_adapter=True, speech_encoder_chunk_size=4,
                              speech_encoder_left_chunk_num=1, speech_encoder_dropout=0.0, dropout=0.0,
                              attention_dropout=0.0, activation_dropout=0.0, speech_encoder_layerdrop=0.0,
                              attn_implementation="sdpa")
    torch.manual_seed(0)
    return seqnorm.make_padding_safe(SeamlessM4Tv2SpeechEncoder(cfg).eval(), attention=attention)


def test_chunked_attention_keeps_its_chunks_and_the_adapter_is_fixed():
    """The chunk masks (right) are unchanged by the key masks: the conformer layers' outputs are the
    same with and without; the adapter's mask counts a half-real frame (14 keys, alone 13), fixed."""
    g = torch.Generator().manual_seed(1)
    x, lengths = torch.randn(2, 41, 16, generator=g), torch.tensor([41, 27])
    outs, errs = {}, {}
    for attention in (True, False):
        enc = _seamless_speech_encoder(attention)
        seen = []
        enc.encoder.layers[-1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
        batched = _run(enc, x, lengths).last_hidden_state
        alone = _run(enc, x[1:, :27], lengths[1:]).last_hidden_state
        outs[attention], errs[attention] = seen[0], (batched[1, :alone.shape[1]] - alone[0]).abs().max().item()
    assert (outs[True] - outs[False]).abs().max().item() <= 1e-6
    assert errs[True] <= TOL and errs[False] > 1e-3, errs


def test_parakeet_masks_are_unchanged():
    """Parakeet masks keys and queries itself (bool, filled at ~mask in its relative-position
    scores): the key masks change nothing, in eval and in training."""
    g = torch.Generator().manual_seed(0)
    x, lengths = torch.randn(2, 130, 32, generator=g), torch.tensor([130, 70])
    x[1, 70:] = 0
    outs = {}
    for attention in (True, False):
        model = _safe("parakeet_encoder", hf.SMALL_CONFIGS["parakeet_encoder"], attention)
        outs[attention] = [_run(model.train(mode), x, lengths).last_hidden_state for mode in (False, True)]
        if attention:
            assert any("masked by make_padding_safe" in line for line in attention_report(model))
    assert max((a - b).abs().max().item() for a, b in zip(outs[True], outs[False])) <= 1e-6


# ---------------------------------------------------------------------------
# nn.MultiheadAttention, opting out, never raising
# ---------------------------------------------------------------------------


class _ConvAttention(nn.Module):
    """A strided conv front end, then torch's MultiheadAttention called without a key_padding_mask."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 4, stride=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x):                                   # x: (B, T, 3)
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)    # B, T', 8
        if not self.batch_first:
            h = h.transpose(0, 1)
        out = self.attn(h, h, h, need_weights=False)[0]
        return out if self.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_gets_a_key_padding_mask(batch_first):
    torch.manual_seed(0)
    net = _ConvAttention(batch_first).eval()
    x, lengths = torch.randn(2, 20, 3), torch.tensor([20, 11])
    errs = {}
    for attention in (False, True):
        seqnorm.make_padding_safe(net, attention=attention)
        with torch.no_grad(), seqnorm.padding(lengths=lengths):
            batched = net(x)
        with torch.no_grad(), seqnorm.padding(lengths=lengths[1:]):
            alone = net(x[1:, :11])
        errs[attention] = (batched[1, :alone.shape[1]] - alone[0]).abs().max().item()
    assert errs[True] <= 1e-5 and errs[False] > 1e-3, errs


def test_unknown_rate_warns_once_and_leaves_the_mask():
    """An attention module at a rate nothing recorded (a reshape halves the steps) runs as torch's,
    with one warning naming it."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(6, 2, batch_first=True).eval()
    x = torch.randn(2, 10, 6)
    with torch.no_grad():
        stock = attn(x[:, ::2], x[:, ::2], x[:, ::2])[0]
    seqnorm.make_padding_safe(attn)
    with torch.no_grad(), seqnorm.padding(lengths=torch.tensor([10, 7])) as ctx, \
            pytest.warns(AttentionWarning, match="'MultiheadAttention': no lengths are known at its 5 keys") as record:
        ctx.record(10, torch.tensor([10, 7]))
        for _ in range(2):
            out = attn(x[:, ::2], x[:, ::2], x[:, ::2])[0]
    assert len([w for w in record if issubclass(w.category, AttentionWarning)]) == 1
    assert torch.equal(out, stock)


def test_outside_the_padding_context_nothing_changes():
    torch.manual_seed(0)
    net = _ConvAttention().eval()
    x = torch.randn(2, 20, 3)
    with torch.no_grad():
        stock = net(x)
        seqnorm.make_padding_safe(net)
        assert torch.equal(net(x), stock)


def test_audit_says_the_attention_leak_is_fixed():
    """After make_padding_safe the audit finds no leak and says the keys were masked; with
    attention=False its first leak is in the encoder's attention, and the note says so."""
    batch, lengths, _ = _wave(4000, 2500)
    mask = (torch.arange(4000)[None, :] < lengths[:, None]).long()
    fixed = seqnorm.audit(_safe("moonshine", MOONSHINE, True).encoder, batch, lengths, attention_mask=mask)
    assert fixed.first_leak is None
    assert any("masked by make_padding_safe" in n for n in fixed.notes)
    off = seqnorm.audit(_safe("moonshine", MOONSHINE, False).encoder, batch, lengths, attention_mask=mask)
    assert off.first_leak is not None and "self_attn" in off.first_leak
    assert any(n.startswith("attention over padded keys: not fixed") for n in off.notes)
