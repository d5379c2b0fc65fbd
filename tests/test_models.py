"""The note's Transformer: outputs at real tokens vs padding and batch-mates.

The note's claim as a test: in training mode (batch statistics), LayerNorm,
RMSNorm and masked BatchNorm give real tokens the same outputs whatever
padding is added; LayerNorm and RMSNorm also whatever else is in the batch;
the note's BatchNorm (padding pooled) does not. In eval mode every variant is
batch-invariant.
"""

import pytest
import torch

from seqnorm.models import NORMS, Encoder


def _model(norm, prenorm=False, seed=0):
    torch.manual_seed(seed)
    return Encoder(vocab_size=20, d_model=16, n_heads=2, d_ff=32, n_layers=2, norm=norm, prenorm=prenorm,
                   num_classes=5, task="tokens", max_len=32).double()


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 20, (3, 7), generator=g)
    lengths = torch.tensor([7, 4, 5])
    mask = torch.arange(7)[None, :] >= lengths[:, None]
    return tokens.masked_fill(mask, 0), mask


def _pad(tokens, mask, extra_t, extra_b, fill=3):
    """Append extra_t padded steps and extra_b fully padded sequences (pads hold `fill`)."""
    b, t = tokens.shape
    big = torch.full((b + extra_b, t + extra_t), fill, dtype=tokens.dtype)
    big_mask = torch.ones(b + extra_b, t + extra_t, dtype=torch.bool)
    big[:b, :t] = tokens
    big_mask[:b, :t] = mask
    return big, big_mask


def _run(model, tokens, mask):
    return model(tokens, mask).detach()


@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("norm", ["layer", "rms", "masked_batch"])
def test_real_tokens_ignore_added_padding_in_training(norm, prenorm):
    tokens, mask = _data()
    model = _model(norm, prenorm).train()
    y = _run(model, tokens, mask)
    big, big_mask = _pad(tokens, mask, extra_t=9, extra_b=2, fill=7)
    y_big = _run(model, big, big_mask)[:3, :7]
    real = ~mask
    torch.testing.assert_close(y_big[real], y[real], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_row_wise_norms_ignore_the_other_sequences(norm):
    tokens, mask = _data()
    model = _model(norm).train()
    alone = _run(model, tokens[:1, :7], mask[:1, :7])
    others = tokens.clone()
    others[1:] = torch.randint(1, 20, others[1:].shape, generator=torch.Generator().manual_seed(5)).masked_fill(mask[1:], 0)
    together = _run(model, others, mask)[:1]
    torch.testing.assert_close(together[~mask[:1]], alone[~mask[:1]], atol=1e-6, rtol=1e-6)


def test_the_notes_batch_norm_moves_with_the_amount_of_padding():
    """Appending 9 padded steps (pads = token 7) to each of the 3 sentences and 2 padded
    sentences shifts the pooled BatchNorm statistics: real-token logits move by up to 1.50
    (measured, float64), 2.43 with 25 padded steps; masked BN moves by < 1e-15."""
    tokens, mask = _data()
    real = ~mask
    big, big_mask = _pad(tokens, mask, extra_t=9, extra_b=2, fill=7)
    moved = {}
    for norm in ("pooled_batch", "masked_batch"):
        model = _model(norm).train()
        y = _run(model, tokens, mask)
        y_big = _run(model, big, big_mask)[:3, :7]
        moved[norm] = float((y_big[real] - y[real]).abs().max())
    assert moved["pooled_batch"] > 0.5, moved
    assert moved["masked_batch"] < 1e-6, moved
    # more padding, more movement
    bigger, bigger_mask = _pad(tokens, mask, extra_t=25, extra_b=2, fill=7)
    model = _model("pooled_batch").train()
    y = _run(model, tokens, mask)
    more = float((_run(model, bigger, bigger_mask)[:3, :7][real] - y[real]).abs().max())
    assert more > moved["pooled_batch"], (more, moved)   # more padding, more movement


@pytest.mark.parametrize("norm", NORMS)
def test_eval_mode_is_batch_invariant_for_every_norm(norm):
    tokens, mask = _data()
    model = _model(norm).train()
    for s in range(3):   # give the running statistics something to hold
        t, m = _data(seed=10 + s)
        model(t, m)
    model.eval()
    alone = _run(model, tokens[1:2, :4], mask[1:2, :4])
    big, big_mask = _pad(tokens, mask, extra_t=6, extra_b=1)
    together = _run(model, big, big_mask)[1:2, :4]
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-6)


def test_classification_head_and_errors():
    tokens, mask = _data()
    enc = Encoder(vocab_size=20, d_model=16, n_heads=2, d_ff=32, n_layers=1, norm="power", num_classes=3)
    assert enc(tokens, mask).shape == (3, 3)
    with pytest.raises(ValueError, match="norm must be one of"):
        Encoder(vocab_size=20, norm="group")
    with pytest.raises(ValueError, match="divisible"):
        Encoder(vocab_size=20, d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="task must be"):
        Encoder(vocab_size=20, task="regress")
