"""The README's before/after table for make_padding_safe on HF speech models.

Each model is built from its config class (hf.SMALL_SPEECH: hidden 32, 2 layers, random weights,
dropout off). Two utterances of 1,600 and 1,000 samples (79 and 49 frames). Columns: the largest
change at a real frame of the short utterance batched with the long one vs alone (eval); of either
utterance when the batch gets 800 more samples of random padding (eval, train); forward time of the
batch without and with the fix (median of 20, this machine).

    python benchmarks/speech_models.py            # prints a markdown table
"""

import copy
import statistics
import time

import torch

import seqnorm
from seqnorm import hf

LONG, SHORT, EXTRA = 1600, 1000, 800


def forward(model, batch, lengths, safe):
    attention_mask = (torch.arange(batch.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        if safe:
            with seqnorm.padding(lengths=lengths):
                return model(batch, attention_mask=attention_mask).last_hidden_state
        return model(batch, attention_mask=attention_mask).last_hidden_state


def padded(seqs, total, noise_seed=None):
    batch = torch.zeros(len(seqs), total) if noise_seed is None else \
        torch.randn(len(seqs), total, generator=torch.Generator().manual_seed(noise_seed)) * 3
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = s
    return batch, torch.tensor([len(s) for s in seqs])


def measure(model, safe):
    g = torch.Generator().manual_seed(1)
    long, short = torch.randn(LONG, generator=g), torch.randn(SHORT, generator=g)
    batch, lengths = padded([long, short], LONG)
    n_short = int(hf.frames(model, SHORT))
    alone = forward(model, short[None], torch.tensor([SHORT]), safe)[0, :n_short]
    batched = forward(model, batch, lengths, safe)
    row = [(batched[1, :n_short] - alone).abs().max().item()]
    more, _ = padded([long, short], LONG + EXTRA, noise_seed=3)
    for train in (False, True):
        model.train(train)
        a, b = forward(model, batch, lengths, safe), forward(model, more, lengths, safe)
        row.append(max((a[i, :n] - b[i, :n]).abs().max().item()
                       for i, n in enumerate(hf.frames(model, lengths).tolist())))
    model.eval()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        forward(model, batch, lengths, safe)
        times.append(time.perf_counter() - t0)
    return row, statistics.median(times) * 1e3


def main():
    torch.set_num_threads(1)
    print("| model (HF config class, small) | batched vs alone, eval | + padding, eval | + padding, train "
          "| forward ms (before → after) |")
    print("|---|---|---|---|---|")
    for name in hf.SPEECH_MODELS:
        model = hf.build(name)
        before, t_before = measure(model, safe=False)
        safe = seqnorm.make_padding_safe(copy.deepcopy(model))
        after, t_after = measure(safe, safe=True)
        cells = " | ".join(f"{b:.3g} → {a:.1e}" for b, a in zip(before, after))
        print(f"| {name} ({hf.SPEECH_MODELS[name]}) | {cells} | {t_before:.1f} → {t_after:.1f} |")


if __name__ == "__main__":
    main()
