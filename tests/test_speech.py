"""`seqnorm compare --tasks speech`: the espeak-ng generator, a micro run end to end, and a
padding-safe speech model decoding the same digits alone and batched (espeak-ng: .ci/run installs it)."""

import copy
import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

import seqnorm
from seqnorm.cli import main
from seqnorm.commands.compare import speech_data as D
from seqnorm.commands.compare import speech_train as S


@pytest.fixture(scope="module")
def splits():
    train, test, _ = D.load_splits(20, 6, seed=3)
    return train, test


def test_generator_lengths_digits_and_held_out_voices(splits):
    train, test = splits
    for split in splits:
        assert split.audio.dtype == np.float32 and np.isfinite(split.audio).all()
        assert len(split.offsets) == len(split) + 1
        assert (split.seconds >= D.MIN_SECONDS).all() and (split.seconds <= D.MAX_SECONDS).all()
        assert all(1 <= len(y) <= D.MAX_DIGITS and all(0 <= d <= 9 for d in y) for y in split.labels)
        assert max(np.abs(split.wave(i)).max() for i in range(len(split))) <= 1.0
    assert len({len(y) for y in train.labels}) > 2 and np.ptp(train.seconds) > 0.5   # lengths vary
    train_variants = {v.split("+")[1] for v in train.voices}
    assert set(train.voices) == {f"{a}+{v}" for a, v in D.TRAIN_VOICES}
    assert set(test.voices) == {f"{a}+{v}" for a, v in D.TEST_VOICES}
    assert not {v.split("+")[1] for v in test.voices} & train_variants   # never heard in training


def test_generator_is_deterministic_and_cached(splits, tmp_path):
    train, _ = splits
    again = D.synthesize(20, D.TRAIN_VOICES, seed=3)
    assert np.array_equal(again.audio, train.audio) and again.labels == train.labels
    other = D.synthesize(4, D.TRAIN_VOICES, seed=4)
    assert other.labels != train.labels[:4] or not np.array_equal(other.wave(0), train.wave(0))
    first = D.load_splits(5, 2, seed=3, cache_dir=str(tmp_path))
    second = D.load_splits(5, 2, seed=3, cache_dir=str(tmp_path))
    assert first[2] > 0 and second[2] == 0                      # synthesized once, then read back
    assert np.abs(second[0].audio - first[0].audio).max() <= 1 / 32767 and second[0].labels == first[0].labels


def test_decoding_and_digit_error_rate():
    logits = torch.full((2, 7, D.VOCAB_SIZE), -5.0)
    for t, tok in enumerate([4, 4, 0, 4, 1, 1, 10]):   # "3 3 0 9" then padding frames
        logits[0, t, tok] = 5.0
    logits[1, :, 3] = 5.0
    assert S.greedy_decode(logits, torch.tensor([7, 2])) == [[3, 3, 0, 9], [2]]
    assert S.der([[3, 3, 0, 9], [2]], [[3, 0, 9], [2, 5]]) == pytest.approx(100 * 2 / 5)


def _logits(model, variant, xs, extra=0):
    """Each input's logits, batched with one companion ``extra`` steps longer than the longest."""
    shape = (max(x.shape[0] for x in xs) + extra,) + tuple(xs[0].shape[1:])
    companion = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x, lengths = S.pad(list(xs) + [companion])
    out = S.forward(model, variant, x, lengths).logits
    frames = S.input_lengths(model, variant, lengths)
    return [out[i, : frames[i]] for i in range(len(xs))]


def test_safe_speech_model_decodes_the_same_alone_and_batched(splits):
    """wav2vec2's group-norm encoder: batched ≠ alone as shipped; after make_padding_safe the
    logits agree and so do the decoded digits (random weights: the best path changes from frame to
    frame, so the decoded strings are not empty)."""
    _, test = splits
    te = S.prepare("wav2vec2", test)
    model = S.build_model("wav2vec2-stock", 0, S.SpeechConfig(hidden=32)).eval()
    safe = seqnorm.make_padding_safe(copy.deepcopy(model)).eval()
    xs = te.x[:3]
    with torch.no_grad():
        alone = [S.forward(model, "wav2vec2-stock", x[None], torch.tensor([len(x)])).logits[0] for x in xs]
        batched = _logits(model, "wav2vec2-stock", xs, extra=2 * max(len(x) for x in xs))
        assert max((a - b).abs().max() for a, b in zip(alone, batched)) > 1e-3   # the leak
        safe_alone = [S.forward(safe, "wav2vec2-safe", x[None], torch.tensor([len(x)])).logits[0] for x in xs]
        safe_batched = _logits(safe, "wav2vec2-safe", xs, extra=2 * max(len(x) for x in xs))
    for a, b, stock in zip(safe_alone, safe_batched, alone):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(a, stock, atol=2e-5, rtol=1e-4)             # unchanged without padding
    decode = lambda ls: S.greedy_decode(torch.nn.utils.rnn.pad_sequence(ls, batch_first=True),  # noqa: E731
                                        torch.tensor([len(l) for l in ls]))
    assert decode(safe_alone) == decode(safe_batched) and all(decode(safe_alone))


def test_safe_parakeet_trains_on_real_frames_only(splits):
    """Parakeet in training: more padding moves the stock BatchNorm's batch statistics (and the
    loss), not the padding-safe one's."""
    train, _ = splits
    tr = S.prepare("parakeet", train)
    cfg = S.SpeechConfig(hidden=32, layers=1, dropout=0.0)   # no dropout: its draws depend on the shape
    labels = S.pad_labels(tr.labels[:3])

    def losses(variant):
        model = S.build_model(variant, 0, cfg).train()
        out = []
        for extra in (0, 40):
            x, lengths = S.pad(tr.x[:3])
            x = torch.nn.functional.pad(x, (0, 0, 0, extra))
            out.append(float(S.forward(model, variant, x, lengths, labels=labels).loss.detach()))
        return out

    stock, safe = losses("parakeet-stock"), losses("parakeet-safe")
    assert abs(stock[0] - stock[1]) > 1e-4
    assert safe[0] == pytest.approx(safe[1], abs=1e-5)


def test_micro_speech_run_writes_csv_table_and_plot(tmp_path):
    out = tmp_path / "sp"
    res = subprocess.run([sys.executable, "-m", "seqnorm", "compare", "--tasks", "speech", "--variants",
                          "parakeet-stock,parakeet-safe", "--seeds", "1", "--steps", "3", "--data-scale", "0.02",
                          "--workers", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].split()[:4] == ["variant", "seeds", "DER", "alone"]
    assert [l.split()[0] for l in res.stdout.strip().splitlines()[1:]] == ["parakeet-stock", "parakeet-safe"]
    with open(out / "speech.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["variant"], r["eval"]) for r in rows] == [(v, e) for v in ("parakeet-stock", "parakeet-safe")
                                                         for e in ("alone", "batched", "sorted")]
    assert all(0 <= float(r["der"]) <= 1000 and r["seed"] == "0" and float(r["rs_var_gap"]) >= 0 for r in rows)
    assert (out / "speech.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "synthesized in" in res.stderr and list((out / "speech-data").glob("*.npz"))


def test_without_espeak_exit_2_naming_the_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(D.shutil, "which", lambda name: None)
    assert main(["compare", "--tasks", "speech", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install espeak-ng" in err[0]


def test_speech_flag_errors(tmp_path, capsys):
    assert main(["compare", "--tasks", "speech", "--variants", "parakeet-big", "--out", str(tmp_path)]) == 2
    assert "--variants: unknown speech variant parakeet-big" in capsys.readouterr().err
