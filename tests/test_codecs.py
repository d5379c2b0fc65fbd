"""Neural audio codecs batched = alone (issue 28): EnCodec, DAC and Mimi built small from their
config classes, called as users call them — ``encode`` with the model's own ``padding_mask``
(1 = real; EnCodec, Mimi), or inside ``seqnorm.padding`` where the model takes no mask (DAC,
and every ``decode``, whose codes are at the frame rate, not the mask's). The clips are
zero-padded as feature extractors pad them. Each check fails on the unconverted model (asserted
too): EnCodec's and Mimi's convolutions pad their own input (reflect / replicate / constant,
causal, plus extra steps to fill the last window), DAC's audio decoder was skipped as if it
were a text decoder."""

import copy
import inspect
import warnings

import pytest
import torch

import seqnorm

transformers = pytest.importorskip("transformers")

LONG = 800
SHORT = 517      # not a multiple of the hop: the extra right padding differs batched vs alone


def _encodec(causal=True, pad_mode="reflect"):
    return transformers.EncodecModel(transformers.EncodecConfig(
        num_filters=8, hidden_size=16, upsampling_ratios=[4, 2], num_lstm_layers=1, codebook_size=32,
        codebook_dim=16, use_causal_conv=causal, pad_mode=pad_mode, target_bandwidths=[12.0], sampling_rate=800))


def _dac():
    return transformers.DacModel(transformers.DacConfig(
        encoder_hidden_size=8, downsampling_ratios=[2, 4], decoder_hidden_size=32, upsampling_ratios=[4, 2],
        hidden_size=32, n_codebooks=8, codebook_size=1024, codebook_dim=4, hop_length=8))


def _mimi():
    return transformers.MimiModel(transformers.MimiConfig(
        num_filters=8, hidden_size=32, upsampling_ratios=[4, 2], codebook_size=32, codebook_dim=16, num_quantizers=2,
        vector_quantization_hidden_dimension=16, upsample_groups=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, sliding_window=50, frame_rate=None))


def _random_codebooks(model, std, seed=0):
    """Codebooks drawn at random at about the scale of what they quantize (EnCodec's and Mimi's
    start at zero, so every code would be 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith((".embed", ".embed_sum")) and buf.dim() == 2:
            buf.copy_(torch.randn(buf.shape, generator=g) * std)
        elif name.endswith(".cluster_usage"):
            buf.fill_(1.0)
        elif name.endswith(".initialized") or name.endswith(".inited"):
            buf.fill_(True)


CODEBOOK_STD = {"encodec": 0.05}


def _build(family, **kw):
    torch.manual_seed(0)
    model = {"encodec": _encodec, "dac": _dac, "mimi": _mimi}[family](**kw).eval()
    with torch.no_grad():
        _random_codebooks(model, CODEBOOK_STD.get(family, 1.0))
    return model


def _batch(seed=0, short=SHORT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, LONG, generator=g)
    x[1, :, short:] = 0                    # zero padding, as the feature extractors pad
    mask = torch.ones(2, LONG, dtype=torch.long)
    mask[1, short:] = 0
    return x, mask


def _encode(family, model, x, mask):
    """``(encoder output (B, C, frames), codes (B, nq, frames))``, called as users call them."""
    if family == "dac":           # DacModel takes no mask
        with seqnorm.padding(lengths=mask.sum(1)):
            return model.encoder(x), model.encode(x).audio_codes
    if family == "mimi":
        return model.encoder(x, padding_mask=mask).latents, model.encode(x, padding_mask=mask).audio_codes
    with seqnorm.padding(lengths=mask.sum(1)):     # EncodecEncoder is no HF model: it takes no mask
        enc = model.encoder(x)
    codes = model.encode(x, padding_mask=mask).audio_codes      # (chunks, B, nq, frames)
    return enc, codes[0]


def _decode(family, model, codes, frames):
    with seqnorm.padding(lengths=frames):
        if family == "encodec":
            return model.decode(codes[None], [None]).audio_values
        if family == "dac":
            return model.decode(audio_codes=codes).audio_values
        return model.decode(codes).audio_values


def _errors(family, model):
    """Batched vs alone at the short clip's real frames / samples: encoder outputs (max abs),
    codes (how many differ), decoded audio (max abs)."""
    x, mask = _batch()
    with torch.no_grad():
        enc_b, codes_b = _encode(family, model, x, mask)
        enc_a, codes_a = _encode(family, model, x[1:, :, :SHORT], mask[1:, :SHORT])
        frames = codes_a.shape[-1]
        codes = codes_b.clone()
        codes[1:, :, :frames] = codes_a          # the same codes, so decode is compared on its own
        dec_b = _decode(family, model, codes, torch.tensor([codes.shape[-1], frames]))
        dec_a = _decode(family, model, codes_a, torch.tensor([frames]))
    n = enc_a.shape[-1]
    samples = min(dec_a.shape[-1], SHORT)
    # relative to the scale of the outputs alone
    return ((enc_b[1:, :, :n] - enc_a).abs().max().item() / enc_a.abs().max().item(),
            int((codes_b[1:, :, :frames] != codes_a).sum()),
            (dec_b[1:, ..., :samples] - dec_a[..., :samples]).abs().max().item() / dec_a.abs().max().item())


#: (family, config, whether its decoder reads past a frame's own end: a causal decoder does not,
#: so it is batched = alone stock too)
FAMILIES = [("encodec", {}, False), ("encodec", dict(causal=False), True),
            ("encodec", dict(pad_mode="constant"), False), ("dac", {}, True), ("mimi", {}, False)]


@pytest.mark.parametrize("family,kw,decoder_leaks", FAMILIES,
                         ids=[f + "".join(f"-{k}={v}" for k, v in kw.items()) for f, kw, _ in FAMILIES])
def test_codec_batched_equals_alone(family, kw, decoder_leaks):
    model = _build(family, **kw)
    stock = _errors(family, model)
    enc, codes, dec = _errors(family, seqnorm.make_padding_safe(copy.deepcopy(model)))
    assert enc <= 1e-5 and codes == 0 and dec <= 1e-5, (family, kw, enc, codes, dec)
    # teeth: the unconverted model's encoder outputs and codes differ batched vs alone, and so
    # does its decoded audio where the decoder reads past a frame's end
    assert stock[0] > 1e-3 and stock[1] > 0, (family, kw, stock)
    assert (stock[2] > 1e-3) == decoder_leaks, (family, kw, stock)


def test_codec_decoders_are_followed_not_skipped():
    """A codec's audio decoder is a time stack (its input is frames); a text decoder's input is
    token ids. Decided by role, not by the name ``decoder``."""
    from seqnorm.attention_safe import decoder_paths

    for family in ("dac", "encodec", "mimi"):
        assert decoder_paths(_build(family)) == [], family


if __name__ == "__main__":        # the figures: python tests/test_codecs.py
    import warnings
    warnings.simplefilter("ignore")
    for family, kw, _ in FAMILIES:
        model = _build(family, **kw)
        print(family, kw, "stock", _errors(family, model), "safe",
              _errors(family, seqnorm.make_padding_safe(copy.deepcopy(model))))


def test_text_decoders_by_role():
    """A submodule named ``decoder`` whose input is frames is followed; a text decoder (token ids
    in, an ``embed_tokens`` table) is left alone whatever its name."""
    from torch import nn

    from seqnorm.attention_safe import decoder_paths

    class TextDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, input_ids):
            return self.norm(self.embed_tokens(input_ids))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.GroupNorm(1, 4))     # audio
            self.speller = TextDecoder()

    model = Model()
    assert decoder_paths(model) == ["speller"]
    seqnorm.make_padding_safe(model)
    assert type(model.decoder[1]).__module__.startswith("seqnorm")          # swapped: followed
    assert type(model.speller.norm) is nn.LayerNorm                         # left alone


@pytest.mark.parametrize("causal", [True, False])
def test_encodec_clip_shorter_than_a_reflect_pad(causal):
    """A clip whose frames are no more than a convolution's reflect padding: alone EnCodec extends
    it with zeros before reflecting (torch refuses a reflection longer than the input), and
    batched it gets the same (causal: pad 6 on the left; not: 3 each side)."""
    short = 40 if causal else 24      # 5 / 3 frames at the last convolution
    model = _build("encodec", causal=causal)
    x, mask = _batch(short=short)

    def error(m):
        with torch.no_grad():
            with seqnorm.padding(lengths=mask.sum(1)):
                batched = m.encoder(x)
            alone = m.encoder(x[1:, :, :short])
        return (batched[1:, :, :alone.shape[-1]] - alone).abs().max().item() / alone.abs().max().item()

    assert error(seqnorm.make_padding_safe(copy.deepcopy(model))) <= 1e-5
    assert error(model) > 1e-3


def test_codec_under_torch_compile_is_followed_not_fullgraph():
    """Under torch.compile a module that pads itself runs eagerly (a graph break around it: not
    fullgraph), and the compiled encode gives the codes the eager padding-safe model gives."""
    model = seqnorm.make_padding_safe(_build("encodec"))
    x, mask = _batch()
    with torch.no_grad():
        eager = model.encode(x, padding_mask=mask).audio_codes
        compiled = torch.compile(model.encode, backend="eager")(x, padding_mask=mask).audio_codes
    assert torch.equal(compiled, eager)
    assert seqnorm.padding_safe.unfollowed(model) == {}


class _PadsItself(torch.nn.Module):
    """A codec-style convolution: pads its own input (left, and right to fill the last window,
    an amount computed from the input's length), then a padding=0 convolution."""

    def __init__(self, kernel, stride, mode):
        super().__init__()
        self.conv = torch.nn.Conv1d(2, 2, kernel, stride)
        self.mode = mode

    def forward(self, x):
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        extra = (-x.shape[-1]) % s
        return self.conv(torch.nn.functional.pad(x, ((k - s) // 2 + (k - s) % 2, (k - s) // 2 + extra), self.mode))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "constant"])
def test_any_module_that_pads_itself_is_followed(mode):
    """The rule is general (no list of classes): a plain module that pads its own input, in each
    of torch's pad modes, with a right pad that depends on the input's length."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(_PadsItself(4, 2, mode), torch.nn.GroupNorm(1, 2), _PadsItself(5, 1, mode),
                              _PadsItself(3, 3, mode)).eval()
    lengths = torch.tensor([40, 23, 31])
    x = torch.randn(3, 2, 40) * (torch.arange(40) < lengths[:, None])[:, None]

    def errors(model):
        with torch.no_grad(), seqnorm.padding(lengths=lengths):
            batched = model(x)
        out = 0.0
        for b, n in enumerate(lengths.tolist()):
            with torch.no_grad():
                alone = model(x[b:b + 1, :, :n])
            out = max(out, (batched[b:b + 1, :, :alone.shape[-1]] - alone).abs().max().item())
        return out

    stock = errors(net)
    assert errors(seqnorm.make_padding_safe(copy.deepcopy(net))) <= 1e-5
    assert stock > 1e-3


class _PadModuleThenConv(torch.nn.Module):
    """FunASR's FSMN without its own masking: ``conv(pad(x))`` through a ``ConstantPad1d`` child."""

    def __init__(self, mode="constant"):
        super().__init__()
        self.conv = torch.nn.Conv1d(2, 2, 5, groups=2, bias=False)
        self.pad = {"constant": torch.nn.ConstantPad1d((2, 2), 0.0),
                    "replicate": torch.nn.ReplicationPad1d((2, 2))}[mode]

    def forward(self, x):
        return self.conv(self.pad(x)) + x


def _short_error(model, x, lengths):
    """Largest difference at the second (short) sequence's real outputs between ``model`` run on
    the batch ``x (2, C, T)`` under the padding context of ``lengths`` and on that sequence alone."""
    short = int(lengths[1])
    with torch.no_grad(), seqnorm.padding(lengths=lengths):
        batched = model(x)
    with torch.no_grad():
        alone = model(x[1:, :, :short])
    return (batched[1:, :, :alone.shape[-1]] - alone).abs().max().item()


def _zero_padded_clips_error():
    """``error(model)``: :func:`_short_error` on two 2-channel clips of 30 and 17 steps, zero-padded."""
    lengths = torch.tensor([30, 17])
    x = torch.randn(2, 2, 30)
    x[1, :, 17:] = 0
    return lambda model: _short_error(model, x, lengths)


@pytest.mark.parametrize("mode", ["constant", "replicate"])
def test_a_pad_module_child_is_followed(mode):
    """A module that pads through one of torch's padding modules (FunASR's FSMN) is followed as one
    that calls functional.pad: batched = alone, and no fallback warning (its conv's input was at a
    rate seqnorm did not know)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(_PadModuleThenConv(mode), torch.nn.Conv1d(2, 2, 3, padding=1)).eval()
    lengths = torch.tensor([30, 17])
    x = torch.randn(2, 2, 30)
    x[1, :, 17:] = 3.0           # padding that is not zero: what it reads past the end shows

    def error(model):
        return _short_error(model, x, lengths)

    assert error(net) > 1e-3                                           # teeth
    safe = seqnorm.make_padding_safe(copy.deepcopy(net))
    with warnings.catch_warnings():
        warnings.simplefilter("error", seqnorm.ConversionWarning)
        assert error(safe) <= 1e-5


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_conv_with_a_padding_mode_is_followed(mode):
    """A Conv1d whose padding_mode is not zeros pads itself (UnivNet's reflect ``conv_pre``): alone
    it reflects (replicates, wraps) its own end; batched, stock, the batch's padding."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 7, padding=3, padding_mode=mode),
                              torch.nn.Conv1d(3, 2, 3, padding=1)).eval()
    error = _zero_padded_clips_error()

    assert error(net) > 1e-3                                           # teeth
    assert error(seqnorm.make_padding_safe(copy.deepcopy(net))) <= 1e-5


def test_a_pad_seqnorm_cannot_follow_falls_back_once():
    """A pad of time and channels at once is not followed: the convolution after it sees a step
    count at no known rate and acts as torch's, with one ConversionWarning (do no harm)."""
    class PadsChannels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 2, 3)

        def forward(self, x):
            return self.conv(torch.nn.functional.pad(x, (1, 1, 1, 1)))

    net = seqnorm.make_padding_safe(torch.nn.Sequential(PadsChannels()))
    x = torch.randn(2, 2, 10)
    with pytest.warns(seqnorm.ConversionWarning, match="no time axis at a rate seqnorm knows"):
        with torch.no_grad(), seqnorm.padding(lengths=torch.tensor([10, 6])):
            out = net(x)
    with torch.no_grad():
        assert torch.equal(out, net[0].conv(torch.nn.functional.pad(x, (1, 1, 1, 1))))


# ---------------------------------------------------------------------------
# XCodec and WavTokenizer (issue 28): codes batched = alone, built from their default configs cut to 2
# layers (hf.small_config without the width settings; random weights)
# ---------------------------------------------------------------------------


def _codes(model, x, mask):
    kw = {"padding_mask": mask} if "padding_mask" in inspect.signature(model.encode).parameters else {}
    with torch.no_grad(), seqnorm.padding(lengths=mask.sum(1)):     # XCodec's encode takes no mask
        return model.encode(x, **kw).audio_codes


def _spread_codebooks(model, x, mask):
    """Codebooks drawn at the scale (of 1e-3 … 10) that gives the most distinct codes on ``x``:
    at random initialisation every frame gets the same code, and nothing could differ."""
    def draw(std):
        g = torch.Generator().manual_seed(1)
        for name, buf in model.named_buffers():
            if name.endswith(".embed") and buf.dim() == 2:
                buf.copy_(torch.randn(buf.shape, generator=g) * std)
            elif name.endswith((".inited", ".initialized")):
                buf.fill_(True)
    best = max((1e-3, 1e-2, 0.1, 1.0, 10.0), key=lambda std: (draw(std), _codes(model, x, mask).unique().numel())[1])
    draw(best)


#: model type → a short clip's length: not a whole number of frames (XCodec: 320-sample frames, the
#: length at which its own choice of padding is the same batched and alone; WavTokenizer: 480)
SELF_PADDING_CODECS = {"xcodec": 1440, "wavtokenizer": 2100}


@pytest.mark.parametrize("model_type", list(SELF_PADDING_CODECS))
def test_codes_batched_equal_alone_xcodec_wavtokenizer(model_type):
    """XCodec pads the waveform in its own forward (for its HuBERT semantic model and, depending on
    the padded length, its DAC acoustic encoder) and mixes the two with a Linear; WavTokenizer's
    encoder is EnCodec-like (reflect padding, then a padding=0 convolution). Stock their codes differ
    batched vs alone; after make_padding_safe they are equal at every real frame."""
    from seqnorm import hf

    short = SELF_PADDING_CODECS[model_type]
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(hf.small_config(model_type, width=False)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 3200, generator=g)
    x[1, :, short:] = 0
    mask = torch.ones(2, 3200, dtype=torch.long)
    mask[1, short:] = 0
    with torch.no_grad():
        _spread_codebooks(model, x, mask)

    def differ(m):
        alone = _codes(m, x[1:, :, :short], mask[1:, :short])
        return int((_codes(m, x, mask)[1:, ..., :alone.shape[-1]] != alone).sum())

    assert differ(model) > 0                                            # teeth
    assert differ(seqnorm.make_padding_safe(copy.deepcopy(model))) == 0


# ---------------------------------------------------------------------------
# A Conv1d subclass that pads in its own forward (moonshine_streaming's causal conv, issue 28)
# ---------------------------------------------------------------------------


class _CausalConv(torch.nn.Conv1d):
    """moonshine_streaming's ``MoonshineStreamingCausalConv1d``: a left pad of ``k − 1``, then
    ``Conv1d.forward`` with ``padding=0`` (no time layer to torch's eyes: its forward is its own)."""

    def forward(self, x):
        return super().forward(torch.nn.functional.pad(x, (self.kernel_size[0] - 1, 0)))


def test_a_conv_subclass_that_pads_itself_is_followed():
    """Its output lengths (⌈L / 2⌉ for stride 2) are recorded, so the next convolution zeroes what it
    reads past each sequence's end: stock the short sequence's last frames read the causal conv's
    output at the first padded frame (which sees real input), batched ≠ alone."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(_CausalConv(2, 3, 5, stride=2), torch.nn.Conv1d(3, 2, 3, padding=1)).eval()
    error = _zero_padded_clips_error()

    assert error(net) > 1e-3                                           # teeth
    safe = seqnorm.make_padding_safe(copy.deepcopy(net))
    with warnings.catch_warnings():
        warnings.simplefilter("error", seqnorm.ConversionWarning)      # its output rate is known: no fallback
        assert error(safe) <= 1e-5


def test_moonshine_streaming_batched_equals_alone():
    """moonshine_streaming frames the waveform by a reshape (a rate no layer follows), then two causal
    strided convs that pad themselves and pass its frame mask on, marking real the frames whose window
    reads any real frame: the short clip's attention reads keys its run alone does not have. After
    make_padding_safe the frame lengths come from the mask its first conv gets, each conv's output
    lengths are recorded, and attention is masked at them: batched = alone, through the model's own
    attention_mask (no context opened by hand)."""
    from seqnorm import hf

    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(hf.small_config("moonshine_streaming")).eval().encoder
    short = 1440
    x = torch.randn(2, 3200, generator=torch.Generator().manual_seed(0))
    x[1, short:] = 0
    mask = torch.ones(2, 3200, dtype=torch.long)
    mask[1, short:] = 0

    def error(m):
        with torch.no_grad():
            batched = m(x, attention_mask=mask).last_hidden_state
            alone = m(x[1:, :short], attention_mask=mask[1:, :short]).last_hidden_state
        return (batched[1:, :alone.shape[1]] - alone).abs().max().item()

    assert error(model) > 1e-2                                          # teeth
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        safe = seqnorm.make_padding_safe(copy.deepcopy(model))
    assert error(safe) <= 1e-4
