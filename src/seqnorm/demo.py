"""The note's worked example, computed by seqnorm and printed step by step.

``python -m seqnorm`` (or ``seqnorm demo``) prints it. Every number comes from
:mod:`seqnorm.functional` and :mod:`seqnorm.reference`; nothing is typed in.
"""

from __future__ import annotations

import numpy as np
import torch

from . import __version__, reference
from . import functional as F

NOTE_MATRIX = [[1.0, 2.0], [3.0, 4.0]]
NOTE_BATCH = [[[1.0, 2.0], [3.0, 4.0]], [[2.0, 3.0], [1.0, 4.0]]]
NOTE_TOKENS = [["你", "好"], ["谢", "谢"]]


def _num(v: float) -> str:
    """4 significant digits, no trailing zeros, a true minus sign: 1.75, 0.8292, −1."""
    s = f"{v:.4g}"
    if s in ("-0", "-0.0"):
        s = "0"
    return s.replace("-", "−")


def _row(values) -> str:
    return "[" + ", ".join(_num(v) for v in values) + "]"


def _substitutions(values, mean, var, outputs) -> str:
    return ", ".join(
        f"({_num(v)} − {_num(mean)})/√{_num(var)} = {_num(o)}" for v, o in zip(values, outputs)
    )


def _explain_groups(title, groups, x, y, stats) -> list:
    lines = [title]
    for label, idx, (mean, var) in zip(groups["labels"], groups["members"], stats):
        vals = [x[i] for i in idx]
        outs = [y[i] for i in idx]
        lines.append(f"  {label}: μ = {_num(mean)}, σ² = {_num(var)}, σ = {_num(np.sqrt(var))}")
        lines.append(f"      {_substitutions(vals, mean, var, outs)}")
    return lines


def note_text() -> str:
    """The demo's text (eps = 0, as in the note)."""
    x = torch.tensor(NOTE_MATRIX, dtype=torch.float64)
    t, d = x.shape
    out = [f"seqnorm {__version__} — the note's example, eps = 0", ""]
    out.append("z = " + _row(x[0].tolist()) + ", " + _row(x[1].tolist()) + "   shape (seq_len, d_model) = (2, 2)")
    out.append("")

    ln = F.layer_norm(x, (d,), eps=0.0)
    _, ln_cache = reference.layer_norm_forward(x.numpy(), eps=0.0)
    out += _explain_groups(
        "LayerNorm — each token (row) over its own features:",
        dict(labels=[f"row {i}" for i in range(t)], members=[[(i, j) for j in range(d)] for i in range(t)]),
        x.numpy(), ln.numpy(),
        [(ln_cache["mean"][i, 0], ln_cache["var"][i, 0]) for i in range(t)],
    )
    out.append("  → " + _row(ln[0].tolist()) + ", " + _row(ln[1].tolist()))
    out.append("")

    bn = F.seq_batch_norm(x, None, None, training=True, eps=0.0)
    _, bn_cache = reference.seq_batch_norm_forward(x.numpy(), eps=0.0)
    out += _explain_groups(
        "BatchNorm — each feature (column) over all tokens:",
        dict(labels=[f"col {j}" for j in range(d)], members=[[(i, j) for i in range(t)] for j in range(d)]),
        x.numpy(), bn.numpy(),
        [(bn_cache["batch_mean"][j], bn_cache["batch_var"][j]) for j in range(d)],
    )
    out.append("  → " + _row(bn[0].tolist()) + ", " + _row(bn[1].tolist()))
    out.append("")

    xb = torch.tensor(NOTE_BATCH, dtype=torch.float64)
    _, cache = reference.seq_batch_norm_forward(xb.numpy(), eps=0.0)
    tokens = " / ".join("".join(s) for s in NOTE_TOKENS)
    m0, v0 = cache["batch_mean"][0], cache["batch_var"][0]
    pooled = [xb[b, i, 0].item() for b in range(2) for i in range(2)]
    out.append(f"A batch of two sentences ({tokens}): {_row(xb[0, :, 0].tolist())} and {_row(xb[1, :, 0].tolist())} in feature 0")
    out.append(f"  BatchNorm pools all four tokens {_row(pooled)}: μ = {_num(m0)}, σ² = {_num(v0)}, σ = {_num(np.sqrt(v0))}")
    _, ln_b = reference.layer_norm_forward(xb.numpy(), eps=0.0)
    per_token = ", ".join(
        f"{NOTE_TOKENS[b][i]} μ = {_num(ln_b['mean'][b, i, 0])}" for b in range(2) for i in range(2)
    )
    out.append(f"  LayerNorm pools each token alone: {per_token}")
    out.append("")

    # The note's point: pad sentence 1 with a zero token. Torch-style BN pools the pad.
    padded = torch.cat([xb, torch.zeros(2, 1, 2, dtype=torch.float64)], dim=1)
    mask = torch.tensor([[False, False, True], [False, False, True]])
    naive = F.seq_batch_norm(padded, None, None, training=True, eps=0.0)
    masked = F.seq_batch_norm(padded, None, None, training=True, eps=0.0, padding_mask=mask)
    _, naive_c = reference.seq_batch_norm_forward(padded.numpy(), eps=0.0)
    out.append("Pad each sentence with one zero token (padding_mask True at the pads):")
    out.append(f"  BN with pads pooled:   feature 0 μ = {_num(naive_c['batch_mean'][0])}, σ² = {_num(naive_c['batch_var'][0])}"
               f" → 你 = {_num(naive[0, 0, 0].item())} (was {_num(masked[0, 0, 0].item())})")
    out.append(f"  SeqBatchNorm (masked): feature 0 μ = {_num(m0)}, σ² = {_num(v0)}"
               f" → 你 = {_num(masked[0, 0, 0].item())}, pads = {_num(masked[0, 2, 0].item())}")
    return "\n".join(out)


def main() -> int:
    print(note_text())
    return 0
