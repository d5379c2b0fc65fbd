"""make_padding_safe on the Hugging Face audio models it was not built against (issue 17).

Parakeet (NeMo's FastConformer: Conv2d subsampling ×8 on (B, 1, T, F), a
BatchNorm1d in every conformer convolution module), SEW-D (a LayerNorm over its
relative-position table, which has no batch or time axis), a plain
Conv2d-subsampled stack, and a parametrized subset of the zoo
(``benchmarks/zoo.py`` runs every audio model type). Models are small, built
from config classes (random weights, nothing downloaded), dropout off.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import seqnorm

transformers = pytest.importorskip("transformers")   # a test dependency (.ci/run installs it)

from seqnorm import hf  # noqa: E402

TOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Small models: one intra-op thread is faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features(seqs, total, feat, noise_seed=None):
    """A (B, total, feat) batch of feature frames; padding zeros, or noise with ``noise_seed``."""
    if noise_seed is None:
        batch = torch.zeros(len(seqs), total, feat)
    else:
        batch = torch.randn(len(seqs), total, feat, generator=torch.Generator().manual_seed(noise_seed)) * 3
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    return batch, torch.tensor([len(s) for s in seqs])


def _parakeet_forward(model, x, lengths, safe):
    attention_mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).long()
    if safe:
        with seqnorm.padding(lengths=lengths):
            return model(x, attention_mask=attention_mask).last_hidden_state
    return model(x, attention_mask=attention_mask).last_hidden_state


def _parakeet_frames(n: int) -> int:
    for _ in range(3):                     # three stride-2 Conv2d (kernel 3, padding 1)
        n = (n - 1) // 2 + 1
    return n


def _parakeet_leaks(model, safe):
    """``(eval: batched vs alone, train: change at real frames under 150 more frames of noise)``."""
    g = torch.Generator().manual_seed(0)
    feat = model.config.num_mel_bins
    long, short = torch.randn(130, feat, generator=g), torch.randn(70, feat, generator=g)
    model = copy.deepcopy(model)
    with torch.no_grad():
        batch, lengths = _features([long, short], 130, feat)
        model.eval()
        batched = _parakeet_forward(model, batch, lengths, safe)
        alone = _parakeet_forward(model, short[None], torch.tensor([70]), safe)
        n = _parakeet_frames(70)
        eval_leak = (batched[1, :n] - alone[0, :n]).abs().max().item()
        model.train()
        a = _parakeet_forward(model, batch, lengths, safe)
        b = _parakeet_forward(model, _features([long, short], 280, feat, noise_seed=1)[0], lengths, safe)
        train_leak = max((a[i, :_parakeet_frames(int(n))] - b[i, :_parakeet_frames(int(n))]).abs().max().item()
                         for i, n in enumerate(lengths))
    return eval_leak, train_leak


def test_parakeet_train_mode_batch_norm_leak_is_fixed():
    model = hf.build("parakeet_encoder", hf.SMALL_CONFIGS["parakeet_encoder"])
    _, stock_train = _parakeet_leaks(model, safe=False)
    assert stock_train > 1e-2, f"stock Parakeet's BatchNorm should pool the padding in training (teeth): {stock_train}"
    safe = seqnorm.make_padding_safe(copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error", seqnorm.ConversionWarning)       # every layer followed, no fall-back
        eval_leak, train_leak = _parakeet_leaks(safe, safe=True)
    assert eval_leak <= TOL
    assert train_leak <= TOL
    x, lengths = _features([torch.randn(50, model.config.num_mel_bins)] * 2, 50, model.config.num_mel_bins)
    with torch.no_grad():                                              # no padding: the stock output
        torch.testing.assert_close(_parakeet_forward(safe, x, lengths, True),
                                   _parakeet_forward(model.eval(), x, lengths, False), atol=1e-5, rtol=1e-5)


def test_sew_d_runs_converted_and_its_table_norm_acts_as_torchs():
    model = hf.build("sew-d", hf.SMALL_CONFIGS["sew-d"])
    x = torch.randn(2, 1600, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([1600, 1000])
    x[1, 1000:] = 0
    attention_mask = (torch.arange(1600)[None, :] < lengths[:, None]).long()
    safe = seqnorm.make_padding_safe(copy.deepcopy(model))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stock = model(x, attention_mask=attention_mask).last_hidden_state
        with seqnorm.padding(lengths=lengths):
            batched = safe(x, attention_mask=attention_mask).last_hidden_state
        with seqnorm.padding(lengths=torch.tensor([1600, 1600])):
            full = safe(x, attention_mask=torch.ones_like(attention_mask)).last_hidden_state
        stock_full = model(x, attention_mask=torch.ones_like(attention_mask)).last_hidden_state
    said = [str(w.message) for w in caught if issubclass(w.category, seqnorm.ConversionWarning)]
    assert len(said) == 1 and "encoder.encoder.LayerNorm" in said[0] and "no batch and time axes" in said[0], said
    assert batched.shape == stock.shape
    assert (full - stock_full).abs().max() <= 1e-5


def test_conv2d_subsampled_stack_batched_equals_alone():
    """(B, 1, T, F) → two stride-2 Conv2d with BatchNorm2d/GroupNorm, a MaxPool2d and an
    AvgPool2d (ceil mode) → (B, T', C·F') → LayerNorm: time found as the axis holding the
    frame count, lengths carried through, 4-d norms masked over (B, T)."""
    torch.manual_seed(0)

    class Front(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                nn.Conv2d(4, 4, (5, 3), stride=(2, 1), padding=(2, 1)), nn.GroupNorm(2, 4), nn.GELU(),
                nn.MaxPool2d(3, stride=1, padding=1), nn.AvgPool2d(2, stride=(2, 1), ceil_mode=True))
            self.channel_norm = nn.LayerNorm(4)                # over C of (B, T', F', C)
            self.norm = nn.LayerNorm(4 * 7)

        def forward(self, x):                                  # x: (B, T, F=16)
            h = self.conv(x.unsqueeze(1))                      # (B, 4, T', 7)
            h = self.channel_norm(h.permute(0, 2, 3, 1))       # (B, T', 7, 4)
            return self.norm(h.flatten(2))                     # (B, T', 28)

    net = Front()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randn(45, 16, generator=g), torch.randn(22, 16, generator=g), torch.randn(31, 16, generator=g)]
    batch, lengths = _features(seqs, 45, 16, noise_seed=2)
    with torch.no_grad():
        stock = net.eval()(batch)
        stock_alone = net(seqs[1][None])
        safe = seqnorm.make_padding_safe(copy.deepcopy(net)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error", seqnorm.ConversionWarning)
            with seqnorm.padding(lengths=lengths):
                batched = safe(batch)
            alone = []
            for s in seqs:
                with seqnorm.padding(lengths=torch.tensor([len(s)])):
                    alone.append(safe(s[None]))
    for i, a in enumerate(alone):
        torch.testing.assert_close(batched[i, : a.shape[1]], a[0], atol=1e-5, rtol=1e-5)
    n = stock_alone.shape[1]
    assert (stock[1, :n] - stock_alone[0]).abs().max() > 1e-2          # teeth


# ---------------------------------------------------------------------------
# A parametrized subset of the zoo (benchmarks/zoo.py runs every audio model type)
# ---------------------------------------------------------------------------


def _zoo():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
    spec = importlib.util.spec_from_file_location("seqnorm_zoo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: model type → what the zoo must find: "fixed" (leaks stock, padding-safe after one call, eval and
#: train), "followed" (safe stock and after, every layer followed: nothing acts as torch's) or
#: "no harm" (runs after the call; layers it cannot follow act as torch's, named)
ZOO_SUBSET = {
    "speech_to_text": "fixed",        # Conv1d subsampling reads past the end (eval and train)
    "parakeet_ctc": "fixed",          # Conv2d subsampling; BatchNorm in training
    "univnet": "fixed",               # its reflect conv_pre reflects the batch's padding (issue 28)
    "vibevoice_acoustic_tokenizer_decoder": "fixed",  # causal convs and transposed convs that crop (issue 28)
    "fun_asr_nano_encoder": "followed",  # its FSMN pads through a ConstantPad1d child: followed (issue 28)
    # its conv module's causal depthwise conv (F.pad(k − 1, 0), then padding=0) is followed; stock it is
    # already batched = alone (a causal pad reads no step past the end, and it masks its own input)
    "wav2vec2-bert": "followed",
}


@pytest.mark.parametrize("model_type", list(ZOO_SUBSET))
def test_zoo_row(model_type):
    row = _zoo().one(model_type)
    assert row["runs"], row.get("note")
    assert not row["raises_after"], row["after"]
    assert all("error" not in row["after"][m] for m in ("eval", "train")), row["after"]
    if ZOO_SUBSET[model_type] == "fixed":
        assert row["leaks_stock"], row["stock"]                      # teeth
        assert row["safe_after"], row["after"]
    elif ZOO_SUBSET[model_type] == "followed":
        assert row["safe_after"] and not row["unfollowed"], row     # (it warned, acting as torch's, before)
    else:
        assert row["unfollowed"], row                                # named, with the reason


# ---------------------------------------------------------------------------
# The zoo's last rows (issue 28): models that did not run at small size
# ---------------------------------------------------------------------------


def test_speecht5_runs_through_its_speech_encoder_and_is_fixed():
    """AutoModel's SpeechT5Model has no speech pre-net; the speech-to-text model's encoder
    takes the waveform (a wav2vec2-style GroupNorm feature encoder: leaks stock)."""
    row = _zoo().one("speecht5")
    assert row["runs"] and row["cls"] == "SpeechT5ForSpeechToText", row.get("note")
    assert row["leaks_stock"], row["stock"]                          # teeth
    assert row["safe_after"], row["after"]


def test_fixed_length_model_is_compared_at_its_length():
    """Whisper runs only at 3000 frames: each clip alone is padded to 3000 too, batched = alone;
    stock its real frames read the padding's values (its convolutions), after the call they do not."""
    row = _zoo().one("whisper")
    assert row["check"] == "fixed length" and row["steps"] == 3000, row
    stock, after = row["compared"]["stock"], row["compared"]["after"]
    assert max(stock["alone"].values()) <= 1e-4
    assert max(stock["padding"].values()) > 1e-3                    # teeth: random padding moves real frames
    assert max(after["padding"].values()) <= 1e-4 and max(after["alone"].values()) <= 1e-4


def test_neucodec_codes_batched_equal_alone_after_the_call():
    """NeuCodec takes a waveform and semantic features at 1/320 of its rate: stock, its semantic
    adapter's convolutions and acoustic encoder read past each clip's end and codes differ batched
    vs alone; after make_padding_safe (both rates in the padding context) they are equal."""
    zoo = _zoo()
    row = zoo.one("neucodec")
    assert row["check"] == "two inputs", row
    stock, after = row["compared"]["stock"]["alone"], row["compared"]["after"]["alone"]
    assert stock["audio_codes"] > 0                                 # teeth
    assert after["audio_codes"] == 0, after


def test_audit_keeps_a_copy_of_each_batched_output():
    """A parent that scales its child's output in place after the child's hook (Gemma 4's
    feed-forward: ``h = norm(h); h *= scale``) is no leak."""

    class ScaleInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            h = self.proj(x)
            h *= 0.5
            return h

    model = nn.Sequential(ScaleInPlace(), nn.Linear(4, 4)).eval()
    x = torch.randn(2, 6, 4)
    x[1, 3:] = 0
    report = seqnorm.audit(model, x, torch.tensor([6, 3]))
    assert report.first_leak is None, report.to_text()
