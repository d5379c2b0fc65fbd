"""seqnorm.audit and `seqnorm audit`: the first leaking layer, before and after make_padding_safe."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import seqnorm
from seqnorm.audit import AuditError
from seqnorm.models import Encoder


def _encoder_case(norm, seed=0):
    torch.manual_seed(seed)
    enc = Encoder(vocab_size=11, d_model=16, n_heads=2, d_ff=32, norm=norm, task="tokens")
    tokens = torch.randint(1, 11, (3, 8), generator=torch.Generator().manual_seed(seed))
    lengths = torch.tensor([8, 5, 3])
    mask = torch.arange(8)[None, :] >= lengths[:, None]
    return enc, tokens, lengths, dict(padding_mask=mask)


def test_the_notes_encoder_leaks_at_its_first_pad_pooling_batchnorm_and_not_with_layernorm():
    enc, tokens, lengths, kw = _encoder_case("pooled_batch")
    report = seqnorm.audit(enc, tokens, lengths, train=True, **kw)
    assert report.first_leak == "layers.0.norm1.norm"
    row = next(r for r in report.modules if r.name == report.first_leak)
    assert row.category == "batch statistics" and row.type == "SeqBatchNorm" and row.leaks
    assert all(not r.leaks for r in report.modules[:report.modules.index(row)])
    assert report.notes and "only the padding comparison counts" in report.notes[0]
    for train in (False, True):
        enc, tokens, lengths, kw = _encoder_case("layer")
        clean = seqnorm.audit(enc, tokens, lengths, train=train, **kw)
        assert clean.first_leak is None and not any(r.leaks for r in clean.modules)
        assert max(r.alone for r in clean.modules) < 1e-5      # the comparisons ran (float rounding only)


def test_the_masked_batchnorm_encoder_does_not_leak_in_training():
    """Batched ≠ alone by design after a training BatchNorm; padding still changes nothing."""
    enc, tokens, lengths, kw = _encoder_case("masked_batch")
    report = seqnorm.audit(enc, tokens, lengths, train=True, **kw)
    assert report.first_leak is None
    assert any(r.alone and r.alone > 1e-3 and not r.alone_counts for r in report.modules)


def test_the_audit_leaves_the_model_as_it_was():
    enc, tokens, lengths, kw = _encoder_case("pooled_batch")
    enc.eval()
    drop = nn.Dropout(0.3)
    enc.layers[0].drop = drop
    before = copy.deepcopy(enc.state_dict())
    seqnorm.audit(enc, tokens, lengths, train=True, **kw)
    assert not enc.training and drop.p == 0.3
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_channels_first_input_with_time_dim():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.GroupNorm(1, 4), nn.Conv1d(4, 4, 3, stride=2))
    x, lengths = torch.randn(2, 4, 20), torch.tensor([20, 11])
    report = seqnorm.audit(net, x, lengths, time_dim=2)
    # the padded conv's last real step reads the first pad (random in the padded run)
    assert report.first_leak == "0" and report.modules[0].category == "convolution across the sequence end"
    assert report.modules[1].leaks and report.modules[1].category == "norm pooling over time"
    assert seqnorm.audit(seqnorm.make_padding_safe(net), x, lengths, time_dim=2).first_leak is None


def test_errors():
    enc, tokens, lengths, kw = _encoder_case("layer")
    with pytest.raises(AuditError, match="the inputs have no padding"):
        seqnorm.audit(enc, tokens, torch.tensor([8, 8, 8]), padding_mask=torch.zeros(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 8\]"):
        seqnorm.audit(enc, tokens, torch.tensor([9, 2, 3]), **kw)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4, 3))
    with pytest.raises(ValueError, match="no module output has a time axis"):
        seqnorm.audit(flat, torch.randn(3, 8, 4), torch.tensor([8, 5, 3]))


transformers = pytest.importorskip("transformers")
from seqnorm import hf  # noqa: E402


def _speech_case(name):
    model = hf.build(name)
    lengths = torch.tensor([1600, 1200, 1000, 700])
    real = torch.arange(1600)[None, :] < lengths[:, None]
    x = torch.randn(4, 1600, generator=torch.Generator().manual_seed(0)) * real
    return model, x, lengths, dict(attention_mask=real.long())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_wav2vec2_leaks_at_the_groupnorm_of_its_first_conv_layer_and_not_after_the_fix(train):
    model, x, lengths, kw = _speech_case("wav2vec2")
    report = seqnorm.audit(model, x, lengths, train=train, **kw)
    assert report.first_leak == "feature_extractor.conv_layers.0.layer_norm"
    row = next(r for r in report.modules if r.name == report.first_leak)
    assert row.type == "GroupNorm" and row.category == "norm pooling over time"
    safe = seqnorm.audit(seqnorm.make_padding_safe(copy.deepcopy(model)), x, lengths, train=train, **kw)
    assert safe.first_leak is None and len(safe.modules) >= len(report.modules)


def test_data2vec_audio_leaks_inside_its_positional_convolution_and_not_after_the_fix():
    model, x, lengths, kw = _speech_case("data2vec-audio")
    report = seqnorm.audit(model, x, lengths, **kw)
    assert report.first_leak.startswith("encoder.pos_conv_embed.")
    row = next(r for r in report.modules if r.name == report.first_leak)
    assert row.category == "convolution across the sequence end"
    assert seqnorm.audit(seqnorm.make_padding_safe(model), x, lengths, **kw).first_leak is None


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "seqnorm", "audit", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_json_before_and_after_safe_and_the_png(tmp_path):
    png = tmp_path / "audit.png"
    r = _cli("--hf", "wav2vec2", "--small", "--safe", "--format", "json", "--png", str(png))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["first_leak"] is None
    assert out["before"]["first_leak"] == "feature_extractor.conv_layers.0.layer_norm"
    assert {"name", "type", "category", "alone", "padding", "leaks"} <= set(out["modules"][0])
    assert png.stat().st_size > 10_000


def test_cli_text_and_markdown(capsys):
    from seqnorm.cli import main

    assert main(["audit", "--hf", "data2vec-audio", "--small", "--train"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("first leak: encoder.pos_conv_embed.") and "train mode" in text and "LEAK" in text
    assert main(["audit", "--hf", "hubert", "--small", "--safe", "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert "before --safe: first leak:" in md and "**no leak" in md and "| module | type | category |" in md


def test_cli_input_features_model_before_and_after_safe(capsys):
    """Parakeet (input_features (B, T, F), F from its config; Conv2d subsampling): stock, the
    conformer's BatchNorm pools the padding in training; after --safe, no leak."""
    from seqnorm.cli import main

    assert main(["audit", "--hf", "parakeet_encoder", "--small", "--safe", "--train", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "before --safe: first leak: layers.0.conv.norm (ParakeetEncoder, train mode" in out, out[:400]
    assert "after --safe:  no leak" in out


FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn

    def no_time_axis():
        return nn.Sequential(nn.Flatten(), nn.Linear(8 * 4, 3)), torch.randn(3, 8, 4), torch.tensor([8, 5, 3])

    def no_padding():
        return nn.Linear(4, 4), torch.randn(3, 8, 4), torch.tensor([8, 8, 8])

''')


@pytest.mark.parametrize("args,message,separate", [
    (["--module", "audit_factories:no_time_axis"], "no module output has a time axis", True),
    (["--module", "audit_factories:no_padding"], "the inputs have no padding", False),
    (["--hf", "no-such-model"], "--hf: cannot build 'no-such-model'", True),
    (["--module", "no_such_package.models:make"], "--module: cannot import 'no_such_package.models'", False),
    (["--hf", "wav2vec2", "--config", "{num_hidden_layers: 2"], "--config: not valid JSON", True),
    (["--hf", "wav2vec2", "--config", "[1, 2]"], "--config: expected a JSON object", False),
    (["--hf", "whisper", "--small", "--batch", "2"], "--hf: whisper needs a fixed input length", False),
], ids=["no-time-axis", "no-padding", "unknown-hf", "bad-module", "bad-json", "json-not-object", "fixed-length"])
def test_cli_errors_exit_2_with_one_line(tmp_path, monkeypatch, capsys, args, message, separate):
    """Half in a separate process (the console script: no traceback reaches the user), half in this
    one (the same code path, without paying for another interpreter and torch import)."""
    (tmp_path / "audit_factories.py").write_text(FACTORIES)
    if separate:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
        r = _cli(*args, env=env)
        code, err = r.returncode, r.stderr
    else:
        from seqnorm.cli import main

        monkeypatch.syspath_prepend(str(tmp_path))
        code, err = main(["audit", *args]), capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqnorm audit: error:") and message in lines[0], err
    assert "Traceback" not in err
    assert len(lines[0]) < 400, lines[0]       # one readable line (transformers' own lists ~1,000 types)


def test_hubert_batchnorm_with_trained_statistics_leaks_through_the_positional_conv():
    """HuBERT's conv_pos_batch_norm (layer-norm feature encoder): in eval with running
    statistics away from (0, 1), padding comes out non-zero and the positional conv reads it."""
    model = hf.build("hubert", {"feat_extract_norm": "layer"})
    bn = model.encoder.pos_conv_embed.batch_norm
    with torch.no_grad():
        bn.running_mean.normal_(generator=torch.Generator().manual_seed(0))
    _, x, lengths, kw = _speech_case("hubert")
    report = seqnorm.audit(model, x, lengths, **kw)
    assert report.first_leak == "encoder.pos_conv_embed.conv"
    assert seqnorm.audit(seqnorm.make_padding_safe(model), x, lengths, **kw).first_leak is None
