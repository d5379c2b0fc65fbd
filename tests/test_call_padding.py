"""make_padding_safe where users call models: the padding context from the model's own mask.

Nothing here opens ``seqnorm.padding``: the models are called the way users call
them — a transformers pipeline, a training step with labels, ``generate``,
``torch.compile``, two threads — with the mask a feature extractor makes (1 at
real steps). Each property is also checked with the automatic context switched
off (``padding_from_mask=False``), where it must fail: the test has teeth.

Models are small HF models built from their config classes (random weights,
dropout, LayerDrop and SpecAugment off; nothing downloaded).
"""

import json
import threading
import warnings

import pytest
import torch

import seqnorm
from seqnorm.call_padding import context_for_call, entry_points, mask_argument

transformers = pytest.importorskip("transformers")   # a test dependency (.ci/run installs it)

from seqnorm import hf  # noqa: E402

VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: i + 5 for i, c in enumerate("abcdefghij")}}


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _clips(n, longest, shortest, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(int(t), generator=g) for t in torch.linspace(longest, shortest, n)]


def _batch(clips):
    """Zero-padded (B, T) batch and the feature extractor's mask (1 at real samples)."""
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    return batch, (torch.arange(batch.shape[1])[None, :] < lengths[:, None]).long()


def _safe(model, auto=True):
    return seqnorm.make_padding_safe(model, padding_from_mask=auto)


def _ctc(seed=0, **config):
    cfg = transformers.Wav2Vec2Config(**{**hf.NO_DROPOUT, **hf.SMALL_SPEECH, "feat_extract_norm": "group",
                                         "vocab_size": len(VOCAB), **config})
    torch.manual_seed(seed)
    return transformers.Wav2Vec2ForCTC(cfg).eval()


def _feature_extractor():
    # group-norm wav2vec2's extractor returns no mask by default: the ASR pipeline needs it to
    return transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.json"
    path.write_text(json.dumps(VOCAB))
    return transformers.Wav2Vec2CTCTokenizer(str(path))


# ---------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------


def _transcripts(model, tokenizer, clips, batch_size):
    asr = transformers.pipeline("automatic-speech-recognition", model=model, feature_extractor=_feature_extractor(),
                                tokenizer=tokenizer, device="cpu")
    return [out["text"] for out in asr([c.numpy() for c in clips], batch_size=batch_size)]


@pytest.mark.parametrize("auto", [True, False])
def test_asr_pipeline_ctc_transcripts_batched_equal_alone(tokenizer, auto):
    """transformers #18501: a group-norm wav2vec2 transcribes otherwise at batch_size > 1."""
    clips = _clips(8, 16000, 5000)
    model = _safe(_ctc(), auto)
    alone, batched = (_transcripts(model, tokenizer, clips, b) for b in (1, 4))
    changed = sum(a != b for a, b in zip(alone, batched))
    if auto:
        assert changed == 0
    else:
        assert changed > 0      # no context: the conversion does nothing for a pipeline


def _scores(model, clips, batch_size):
    classify = transformers.pipeline("audio-classification", model=model, feature_extractor=_feature_extractor(),
                                     device="cpu", top_k=None)
    outs = classify([c.numpy() for c in clips], batch_size=batch_size)
    return torch.tensor([[d["score"] for d in sorted(o, key=lambda d: d["label"])] for o in outs])


@pytest.mark.parametrize("auto", [True, False])
def test_audio_classification_pipeline_scores(auto):
    cfg = transformers.HubertConfig(**{**hf.NO_DROPOUT, **hf.SMALL_SPEECH, "conv_pos_batch_norm": True,
                                       "num_labels": 5})
    torch.manual_seed(0)
    model = transformers.HubertForSequenceClassification(cfg).eval()
    with torch.no_grad():     # a confident head, as a trained one is (random logits are near 0: scores near 1/5)
        model.classifier.weight.mul_(100.0)
    model = _safe(model, auto)
    clips = _clips(4, 16000, 6000, seed=2)
    gap = (_scores(model, clips, 1) - _scores(model, clips, 4)).abs().max().item()
    assert gap <= 1e-5 if auto else gap > 1e-3


# ---------------------------------------------------------------------------
# A training step with labels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("auto", [True, False])
def test_ctc_training_step_losses_and_gradients_batched_equal_alone(auto):
    model = _safe(_ctc(ctc_loss_reduction="none"), auto).train()
    clips = _clips(3, 6000, 3000, seed=3)
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100], [11, -100, -100, -100]])
    batch, mask = _batch(clips)
    losses = model(batch, attention_mask=mask, labels=labels).loss
    assert losses.shape == (3,)
    worst_loss = worst_grad = 0.0
    for i, clip in enumerate(clips):
        model.zero_grad()
        losses = model(batch, attention_mask=mask, labels=labels).loss
        losses[i].backward()
        batched = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        alone = model(clip[None], attention_mask=torch.ones(1, len(clip), dtype=torch.long),
                      labels=labels[i: i + 1]).loss
        alone[0].backward()
        worst_loss = max(worst_loss, abs(losses[i].item() - alone[0].item()) / abs(alone[0].item()))
        # relative to the largest gradient entry: some are 0 in exact arithmetic (a key bias under softmax)
        scale = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
        for n, p in model.named_parameters():
            if p.grad is not None:
                worst_grad = max(worst_grad, (batched[n] - p.grad).abs().max().item() / scale)
    if auto:
        assert worst_loss <= 1e-5 and worst_grad <= 1e-4
    else:
        assert worst_loss > 1e-5 and worst_grad > 1e-3


# ---------------------------------------------------------------------------
# Encoder-decoder generate
# ---------------------------------------------------------------------------


def _moonshine(seed=0):
    cfg = transformers.MoonshineConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                                       encoder_num_hidden_layers=2, decoder_num_hidden_layers=2,
                                       encoder_num_attention_heads=2, decoder_num_attention_heads=2,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(seed)
    return transformers.MoonshineForConditionalGeneration(cfg).eval()


def _generate(model, x, mask):
    with torch.no_grad():
        out = model.generate(x, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1).nan_to_num(0.0, 0.0, 0.0)   # (B, steps, vocab)


@pytest.mark.parametrize("auto", [True, False])
def test_generate_encoder_decoder_batched_equal_alone(auto):
    """Moonshine: a GroupNorm over time in its stem, and a cross-attention mask that slices
    the waveform mask every 384th sample (keys past a short clip's end count as real)."""
    model = _safe(_moonshine(), auto)
    clips = _clips(3, 16000, 5000, seed=4)
    batch, mask = _batch(clips)
    ids, scores = _generate(model, batch, mask)
    worst = 0.0
    for i, clip in enumerate(clips):
        ids_alone, scores_alone = _generate(model, clip[None], torch.ones(1, len(clip), dtype=torch.long))
        if auto:
            assert ids[i].tolist() == ids_alone[0].tolist()
        worst = max(worst, (scores[i] - scores_alone[0]).abs().max().item())
    assert worst <= 1e-5 if auto else worst > 1e-3


def test_asr_pipeline_generate_transcripts(tokenizer):
    """The ASR pipeline's generate path (an encoder-decoder): transcripts batch 3 = batch 1."""
    model = _safe(_moonshine())
    asr = transformers.pipeline("automatic-speech-recognition", model=model, feature_extractor=_feature_extractor(),
                                tokenizer=tokenizer, device="cpu")
    clips = [c.numpy() for c in _clips(3, 16000, 5000, seed=4)]
    kwargs = dict(generate_kwargs=dict(max_new_tokens=8, min_new_tokens=8))
    alone = [o["text"] for o in asr(clips, batch_size=1, **kwargs)]
    batched = [o["text"] for o in asr(clips, batch_size=3, **kwargs)]
    assert batched == alone


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


def _compile_case(name):
    model = hf.build(name)
    main = "input_features" if name.startswith("parakeet") else "input_values"
    steps = 200 if main == "input_features" else 4000
    x, lengths, kwargs = hf.audio_batch(model, model.config, main, 3, steps)
    return model, x, lengths, kwargs


def _alone(model, x, lengths, kwargs, i):
    name = next(iter(kwargs))
    xi = x[i: i + 1, : int(lengths[i])]
    with torch.no_grad():
        return model(xi, **{name: kwargs[name][i: i + 1, : int(lengths[i])]}).last_hidden_state[0]


@pytest.mark.parametrize("name", ["wav2vec2", "hubert", "parakeet_encoder"])
def test_compile_fullgraph_no_break_and_batched_equal_alone(name):
    model, x, lengths, kwargs = _compile_case(name)
    _safe(model)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x, **kwargs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x, **kwargs).last_hidden_state
        eager = model(x, **kwargs).last_hidden_state
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for i in (1, 2):
        alone = _alone(model, x, lengths, kwargs, i)          # (frames of sequence i alone, D)
        torch.testing.assert_close(out[i, : alone.shape[0]], alone, atol=1e-4, rtol=1e-4)


def test_compile_teeth_without_automatic_context():
    """The same check fails on a padding-safe model whose calls open no context."""
    model, x, lengths, kwargs = _compile_case("wav2vec2")
    _safe(model, auto=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x, **kwargs).last_hidden_state
    alone = _alone(model, x, lengths, kwargs, 2)
    assert (out[2, : alone.shape[0]] - alone).abs().max() > 1e-3


def test_compile_other_lengths_do_not_recompile():
    """Under dynamic shapes a batch of other lengths (other mask values, other T) reuses the graph."""
    model, x, lengths, kwargs = _compile_case("wav2vec2")
    _safe(model)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    with torch.no_grad():
        compiled(x, **kwargs)
        first = len(graphs)
        for batch, steps in ((3, 4000), (4, 5200), (2, 3200)):
            clips = _clips(batch, steps, steps // 3, seed=steps)
            xb, mask = _batch(clips)
            out = compiled(xb, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(out, model(xb, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert len(graphs) <= first + 1


# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("auto", [True, False])
def test_two_threads_each_get_what_they_get_alone(auto):
    model = _safe(_ctc(), auto)
    batches = [_batch(_clips(3, 9000, 3000, seed=5)), _batch(_clips(2, 7000, 4000, seed=6))]
    with torch.no_grad():
        expected = []
        for batch, mask in batches:
            lengths = mask.sum(1)
            with seqnorm.padding(lengths=lengths):      # the explicit context: what the batch gets alone
                expected.append(model(batch, attention_mask=mask).logits)
    start = threading.Barrier(2)
    worst = [0.0, 0.0]

    def serve(k):
        batch, mask = batches[k]
        start.wait()
        with torch.no_grad():
            for _ in range(6):
                out = model(batch, attention_mask=mask).logits
                frames = hf.frames(model, mask.sum(1))
                for b in range(batch.shape[0]):
                    n = int(frames[b])
                    worst[k] = max(worst[k], (out[b, :n] - expected[k][b, :n]).abs().max().item())

    threads = [threading.Thread(target=serve, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(worst) <= 1e-5 if auto else max(worst) > 1e-3
    assert seqnorm.masks.current_padding() is None


# ---------------------------------------------------------------------------
# The rules: which argument, the caller's context wins, no mask / no padding
# ---------------------------------------------------------------------------


def test_mask_argument_conventions():
    model = _ctc()
    arg = mask_argument(model)
    assert (arg.name, arg.real, arg.input_name) == ("attention_mask", True, "input_values")
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, batch_first=True), 1,
                                          enable_nested_tensor=False)
    arg = mask_argument(encoder)
    assert (arg.name, arg.real) == ("src_key_padding_mask", False)
    assert mask_argument(seqnorm.LayerNorm(4)).real is False       # seqnorm's padding_mask: True = padding
    assert mask_argument(torch.nn.Linear(2, 2)) is None
    # the model and its HF sub-models that take a mask (generate calls the encoder on its own)
    names = [n for n, _ in entry_points(_moonshine(), skip=["model.decoder"])]
    assert names == ["", "model", "model.encoder"]


def test_mask_that_fits_no_axis_opens_nothing():
    arg = mask_argument(_ctc())
    x = torch.randn(2, 100)
    assert context_for_call(arg, (x,), {"attention_mask": torch.ones(2, 7, dtype=torch.long)}) is None
    assert context_for_call(arg, (x,), {"attention_mask": torch.ones(2, 100, dtype=torch.long)}) is None  # no pad
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, 60:] = 0
    ctx = context_for_call(arg, (x,), {"attention_mask": mask})
    assert ctx is not None and ctx.lengths_at(100).tolist() == [100, 60]


def test_no_mask_and_no_padding_compute_what_stock_computes():
    stock = _ctc()
    model = _safe(_ctc())
    batch, mask = _batch(_clips(2, 6000, 6000))
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, stock(batch).logits, atol=1e-6, rtol=1e-5)
        same = model(batch, attention_mask=mask).logits          # a mask without padding opens nothing
        assert torch.equal(same, model(batch).logits)


def test_the_callers_context_wins():
    model = _safe(_ctc())
    batch, mask = _batch(_clips(2, 6000, 3000, seed=7))
    wrong = torch.tensor([6000, 6000])          # the caller says: no padding
    with torch.no_grad():
        with seqnorm.padding(lengths=wrong):
            callers = model(batch, attention_mask=mask).logits
        own = model(batch, attention_mask=mask).logits
        _safe(model, auto=False)                # the same model without the call hooks
        with seqnorm.padding(lengths=wrong):
            without_hooks = model(batch, attention_mask=mask).logits
    assert torch.equal(callers, without_hooks)   # the model's mask did not replace the caller's context
    assert (callers - own).abs().max() > 1e-3


def test_kept_context_is_per_model_and_mask():
    """generate's steps reuse the context their encoder call opened (same model, same mask);
    another model, or the mask changed in place, gets a fresh one."""
    arg = mask_argument(_ctc())
    x = torch.randn(2, 100)
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, 60:] = 0
    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    first = context_for_call(arg, (x,), {"attention_mask": mask}, a)
    assert context_for_call(arg, (None,), {"attention_mask": mask}, a) is first     # a decoder step: no input
    assert context_for_call(arg, (x,), {"attention_mask": mask}, b) is not first
    fresh = context_for_call(arg, (x,), {"attention_mask": mask}, a)
    mask[1, 50:] = 0
    changed = context_for_call(arg, (x,), {"attention_mask": mask}, a)
    assert changed is not fresh and changed.lengths_at(100).tolist() == [100, 50]
