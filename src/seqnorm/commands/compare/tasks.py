"""Embedded tasks with variable-length sequences. Nothing is downloaded.

* ``majority`` (synthetic, deterministic): a sequence of 3–64 tokens drawn from
  6 symbols, each sequence with its own skewed symbol distribution; the label
  is the most frequent symbol (ties to the smallest). Lengths vary 20-fold, so
  a batch mixes very different amounts of padding.
* ``majority_fixed`` (control): the same task with every sequence 32 tokens
  long (about the mean length of ``majority``), so a batch holds no padding and
  equally long sentences — the "vision-like" case, where the PowerNorm paper
  found batch statistics steady.
* ``wordorder`` (real text): English sentences of 4–48 words from the Python
  documentation that ships with CPython (``pydoc_data.topics``, the text of
  ``help()``; Python Software Foundation License; on Debian in the
  ``libpython3.x-stdlib`` package); label 1 for the sentence as written, 0 for
  the same words shuffled. Real word statistics, real length distribution.

Token id 0 is padding; every task returns ``(tokens, lengths, labels)`` tensors
for a train and a validation split, fixed by the seed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from ...masks import lengths_to_padding_mask

TASKS = ("majority", "wordorder", "majority_fixed")


@dataclass
class Split:
    tokens: torch.Tensor    # (N, T_max) long, 0 = padding
    lengths: torch.Tensor   # (N,) long
    labels: torch.Tensor    # (N,) long


@dataclass
class Task:
    name: str
    vocab_size: int
    num_classes: int
    train: Split
    val: Split
    description: str


def _pack(seqs: List[List[int]], labels: List[int]) -> Split:
    t = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return Split(tokens, torch.tensor([len(s) for s in seqs]), torch.tensor(labels))


def majority(n_train: int = 2000, n_val: int = 500, seed: int = 0, min_len: int = 3, max_len: int = 64,
             name: str = "majority") -> Task:
    rng = np.random.default_rng(seed)
    k = 6

    def one():
        length = int(rng.integers(min_len, max_len + 1))
        p = rng.dirichlet(np.ones(k) * 0.7)
        seq = rng.choice(k, size=length, p=p)
        label = int(np.bincount(seq, minlength=k).argmax())
        return [int(s) + 1 for s in seq], label

    data = [one() for _ in range(n_train + n_val)]
    seqs, labels = zip(*data)
    return Task(name, k + 1, k, _pack(list(seqs[:n_train]), list(labels[:n_train])),
                _pack(list(seqs[n_train:]), list(labels[n_train:])),
                f"most frequent of 6 symbols, lengths {min_len}–{max_len} (synthetic)")


def _sentences() -> List[List[str]]:
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    out = []
    for sent in re.split(r"(?<=[.!?])\s+", text):
        words = re.findall(r"[a-z]+", sent.lower())
        if 4 <= len(words) <= 48:
            out.append(words)
    return out


def wordorder(n_train: int = 2300, n_val: int = 600, seed: int = 0, vocab: int = 2000) -> Task:
    rng = np.random.default_rng(seed)
    sents = _sentences()   # about 2,900 sentences in CPython 3.11's help() text
    if n_train + n_val > len(sents):
        raise ValueError(f"wordorder has {len(sents)} sentences, asked for {n_train} + {n_val}")
    order = rng.permutation(len(sents))
    sents = [sents[i] for i in order[: n_train + n_val]]
    counts = Counter(w for s in sents[:n_train] for w in s)
    ids: Dict[str, int] = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(vocab - 2))}  # 0 pad, 1 unk
    seqs, labels = [], []
    for s in sents:
        toks = [ids.get(w, 1) for w in s]
        if rng.random() < 0.5:
            perm = rng.permutation(len(toks))
            if np.all(perm == np.arange(len(toks))):
                perm = perm[::-1]
            toks = [toks[i] for i in perm]
            labels.append(0)
        else:
            labels.append(1)
        seqs.append(toks)
    return Task("wordorder", vocab, 2, _pack(seqs[:n_train], labels[:n_train]),
                _pack(seqs[n_train:], labels[n_train:]),
                "sentence as written vs words shuffled; Python's help() text (real English)")


def load(name: str, scale: float = 1.0, seed: int = 0) -> Task:
    """The task ``name`` with ``scale`` × its default number of examples."""
    if name == "majority":
        return majority(int(2000 * scale), int(500 * scale), seed)
    if name == "majority_fixed":
        return majority(int(2000 * scale), int(500 * scale), seed, min_len=32, max_len=32, name=name)
    if name == "wordorder":
        return wordorder(int(2300 * scale), int(600 * scale), seed)
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")


def batches(split: Split, batch_size: int, order: str, rng: np.random.Generator) -> List[Tuple[torch.Tensor, ...]]:
    """Mini-batches trimmed to their longest sequence. ``order``: ``"shuffled"``
    (random composition) or ``"bucketed"`` (sorted by length: little padding)."""
    n = split.labels.shape[0]
    idx = rng.permutation(n) if order == "shuffled" else np.argsort(split.lengths.numpy(), kind="stable")
    out = []
    for start in range(0, n, batch_size):
        sel = torch.as_tensor(idx[start:start + batch_size])
        lengths = split.lengths[sel]
        t = int(lengths.max())
        tokens = split.tokens[sel, :t]
        mask = lengths_to_padding_mask(lengths, t)
        out.append((tokens, mask, split.labels[sel]))
    return out
