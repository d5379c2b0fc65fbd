r"""``seqnorm compare --tasks speech``, compute: train CTC speech models on espeak-ng digits, as
shipped and made padding-safe, and measure what the padding leak costs in digit errors.

Variants (the CSV's ``variant``):

* ``parakeet-stock``: HF ``ParakeetForCTC`` from its config (hidden 96, 2 conformer layers,
  ×4 Conv2d subsampling with 32 channels, 366 k parameters) on ``ParakeetFeatureExtractor``
  log-mel features, computed per utterance alone. HF masks its evaluation (batched = alone),
  but in training the BatchNorm of every conformer convolution module pools the padded frames
  of the batch into its batch statistics and running statistics — a train-time leak;
* ``parakeet-safe``: the same model after :func:`seqnorm.make_padding_safe`, trained and
  evaluated inside :func:`seqnorm.padding`: its BatchNorm counts real frames only;
* ``wav2vec2-stock``: HF ``Wav2Vec2ForCTC`` on raw 16 kHz audio (normalized per utterance),
  pre-norm layers, a 3-conv × 64-channel feature encoder at 25 frames/s, no SpecAugment or
  dropout (:func:`wav2vec2_config`), with the group-norm feature encoder: its GroupNorm pools
  each sequence over time, padding included, in training *and* at inference (batched ≠ alone);
* ``wav2vec2-safe``: that model after :func:`seqnorm.make_padding_safe`;
* ``wav2vec2-layer``: the layer-norm feature encoder (``feat_extract_norm="layer"``, a
  LayerNorm per frame), the configuration HF recommends for batched inference.

Every model is trained with AdamW and a one-cycle schedule on shuffled mini-batches (so every
batch mixes lengths), then each held-out utterance is decoded greedily (CTC: best path,
repeats merged, blanks dropped) three ways:

* ``alone``: batch size 1, no padding;
* ``batched``: in a batch whose longest member is 2–4× longer than every other (a companion
  made of other test utterances; its own errors are not counted);
* ``sorted``: length-sorted batches (as little padding as batching allows).

The digit error rate is :math:`100 \cdot \sum_i \text{edit}(\hat y_i, y_i) / \sum_i |y_i|` over
the test utterances. For Parakeet we also measure how far the running statistics the
BatchNorms learned sit from the statistics of the real frames they normalize (measured after
training, on training utterances, padding excluded), averaged over the conformer layers:

.. math::
    \text{gap}_\mu = \frac{\lVert \mu_\text{run} - \mu_\text{data} \rVert}{\lVert \sigma_\text{data} \rVert},
    \qquad
    \text{gap}_{\sigma^2} = \frac{\lVert \sigma^2_\text{run} - \sigma^2_\text{data} \rVert}
                               {\lVert \sigma^2_\text{data} \rVert}
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import speech_data as D

VARIANTS = ("parakeet-stock", "parakeet-safe", "wav2vec2-stock", "wav2vec2-safe", "wav2vec2-layer")
EVALS = ("alone", "batched", "sorted")


@dataclass
class SpeechConfig:
    variants: List[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: int = 2
    n_train: int = 1500
    n_test: int = 200
    data_seed: int = 0
    batch_size: int = 16
    eval_batch_size: int = 8
    parakeet_steps: int = 300
    parakeet_lr: float = 2e-3
    wav2vec2_steps: int = 600
    wav2vec2_lr: float = 3e-3
    hidden: int = 96
    layers: int = 2
    dropout: float = 0.1         # Parakeet's; wav2vec2 trains without dropout (wav2vec2_config)
    log_every: int = 25
    stat_utterances: int = 256   # training utterances the running-statistics gap is measured on


QUICK = SpeechConfig(seeds=2)
FULL = SpeechConfig(seeds=3, n_train=3000, n_test=300, parakeet_steps=800, wav2vec2_steps=1200)


@dataclass
class SpeechRun:
    variant: str
    seed: int
    der: Dict[str, float]              # eval → digit error rate, percent
    changed: Dict[str, float]          # eval → % of test utterances decoded otherwise than alone
    train_loss: float                  # mean CTC loss over the last 10 % of steps
    rs_mean_gap: Optional[float]       # Parakeet only (BatchNorm)
    rs_var_gap: Optional[float]
    seconds: float                     # wall time of the run (training, evaluation, statistics)
    cpu_seconds: float                 # CPU time its process spent on it (one torch thread: ≈ wall unloaded)
    loss_steps: List[int]
    loss_curve: List[float]


def family(variant: str) -> str:
    return variant.split("-")[0]


# ---------------------------------------------------------------------------- models

def torch_default_init(model: nn.Module) -> nn.Module:
    r"""Re-draw every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` of ``model`` with torch's
    default initialization (``reset_parameters``: Kaiming-uniform weights with
    :math:`a = \sqrt 5`, i.e. :math:`U(-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}})`,
    and biases alike) instead of HF's :math:`\mathcal N(0, 0.02^2)`.

    HF's draw suits loading a checkpoint. From scratch it shrinks a deep front end's signal
    layer by layer (Parakeet's four subsampling layers: std 5·10⁻⁵ on unit-variance log-mels,
    below the first LayerNorm's eps) and CTC sits on its blank plateau for hundreds of steps;
    torch's fan-in scaled draw (what NeMo, Parakeet's origin, and fairseq's wav2vec 2.0 train
    with) keeps every layer's output near unit scale. Modules under a parametrization (HF's
    weight-normed positional convolution in wav2vec2) keep HF's draw, which is fan-in scaled
    already. Returns ``model``."""
    from torch.nn.utils import parametrize

    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not parametrize.is_parametrized(m):
            m.reset_parameters()
    return model


def wav2vec2_config(variant: str, cfg: "SpeechConfig"):
    r"""The ``Wav2Vec2Config`` of a wav2vec2 variant: the recipe that leaves the CTC blank plateau
    on 2 cores in a few hundred steps (the 5-conv, 100 frames/s post-norm model with dropout and
    HF's initialization did not in 450 steps):

    * ``do_stable_layer_norm=True``: pre-norm transformer layers (wav2vec2-large's layout),
      whatever the feature encoder's norm (``feat_extract_norm``: ``"group"`` — one GroupNorm
      with a group per channel after the first convolution, pooling each sequence over time —
      for ``-stock``/``-safe``, ``"layer"`` — a LayerNorm per frame after every convolution —
      for ``-layer``);
    * a 3-convolution × 64-channel feature encoder, kernels (400, 3, 3), strides (160, 2, 2): a
      25 ms window every 10 ms, then two ×2 downsamplings, so
      :math:`L_1 = \lfloor (L - 400)/160 \rfloor + 1`, :math:`L_{k+1} = \lfloor (L_k - 3)/2
      \rfloor + 1`: 25 frames/s (11 frames for 0.5 s, 23 for 1 s, 98 for 4 s);
    * no SpecAugment (``mask_time_prob = mask_feature_prob = 0``), no dropout, no layerdrop."""
    import transformers

    return transformers.Wav2Vec2Config(
        vocab_size=D.VOCAB_SIZE, pad_token_id=D.BLANK, ctc_loss_reduction="mean", ctc_zero_infinity=True,
        hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=4,
        intermediate_size=2 * cfg.hidden, do_stable_layer_norm=True,
        conv_dim=(64,) * 3, conv_kernel=(400, 3, 3), conv_stride=(160, 2, 2), conv_bias=True,
        feat_extract_norm="layer" if variant == "wav2vec2-layer" else "group",
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0, apply_spec_augment=False, mask_time_prob=0.0,
        mask_feature_prob=0.0)


def build_model(variant: str, seed: int, cfg: SpeechConfig) -> nn.Module:
    """The untrained model of ``variant`` (made padding-safe for ``-safe``), weights drawn with
    ``seed``, torch's default initialization for its linear and conv layers
    (:func:`torch_default_init`)."""
    import transformers
    from ...padding_safe import make_padding_safe

    if variant not in VARIANTS:
        raise ValueError(f"variant: unknown speech variant {variant!r}; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    if family(variant) == "parakeet":
        enc = dict(hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=4,
                   intermediate_size=2 * cfg.hidden, subsampling_factor=4, subsampling_conv_channels=32,
                   num_mel_bins=80, layerdrop=0.0, dropout=cfg.dropout, activation_dropout=cfg.dropout,
                   attention_dropout=cfg.dropout)
        model = transformers.ParakeetForCTC(transformers.ParakeetCTCConfig(
            vocab_size=D.VOCAB_SIZE, pad_token_id=D.BLANK, encoder_config=enc))
    else:
        model = transformers.Wav2Vec2ForCTC(wav2vec2_config(variant, cfg))
    torch_default_init(model)
    if variant.endswith("-safe"):
        make_padding_safe(model)
    return model


def input_lengths(model: nn.Module, variant: str, lengths: torch.Tensor) -> torch.Tensor:
    """Output frames of utterances whose inputs have ``lengths`` steps (mel frames or samples)."""
    if family(variant) == "parakeet":
        return model._get_subsampling_output_length(lengths).long()
    return model._get_feat_extract_output_lengths(lengths).long()


def forward(model: nn.Module, variant: str, x: torch.Tensor, lengths: torch.Tensor, labels=None):
    """The HF model's output on a padded batch (``attention_mask`` from ``lengths``); a ``-safe``
    model runs inside :func:`seqnorm.padding`."""
    from ...masks import padding

    mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).long()
    kw = dict(attention_mask=mask, labels=labels)
    kw["input_features" if family(variant) == "parakeet" else "input_values"] = x
    # lengths at the model's input rate (mel frames, samples): make_padding_safe follows them
    # through the Conv2d subsampling / the conv feature encoder to every norm
    ctx = padding(lengths=lengths) if variant.endswith("-safe") \
        else contextlib.nullcontext()
    with ctx:
        return model(**kw)


# ---------------------------------------------------------------------------- data

@dataclass
class Inputs:
    """One split as a model family reads it: per utterance, its input alone (``(T, 80)`` log-mel
    features or ``(T,)`` normalized samples) and its digits."""
    x: List[torch.Tensor]
    labels: List[List[int]]

    def lengths(self, idx) -> torch.Tensor:
        return torch.tensor([self.x[i].shape[0] for i in idx])


@functools.lru_cache(maxsize=None)
def _feature_extractor():
    from transformers import ParakeetFeatureExtractor

    return ParakeetFeatureExtractor()


def model_input(fam: str, wave: np.ndarray) -> torch.Tensor:
    """One utterance's input, computed alone: Parakeet's log-mel features (normalized per
    utterance by HF's extractor, its real frames only) or wav2vec2's zero-mean unit-variance
    samples (what ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does)."""
    if fam == "parakeet":
        out = _feature_extractor()(wave, sampling_rate=D.SAMPLE_RATE, return_tensors="pt")
        return out["input_features"][0, : int(out["attention_mask"].sum())].contiguous()
    w = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    return (w - w.mean()) / (w.std() + 1e-7)


def prepare(fam: str, split: D.SpeechSplit) -> Inputs:
    return Inputs([model_input(fam, split.wave(i)) for i in range(len(split))], split.labels)


def pad(xs: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded batch ``(B, T_max, ...)`` and lengths ``(B,)``."""
    lengths = torch.tensor([x.shape[0] for x in xs])
    out = xs[0].new_zeros((len(xs), int(lengths.max())) + tuple(xs[0].shape[1:]))
    for i, x in enumerate(xs):
        out[i, : x.shape[0]] = x
    return out, lengths


def pad_labels(labels: List[List[int]]) -> torch.Tensor:
    """CTC targets: digit ``d`` as token ``d + 1``; -100 past each string's end (ignored)."""
    out = torch.full((len(labels), max(len(y) for y in labels)), -100, dtype=torch.long)
    for i, y in enumerate(labels):
        out[i, : len(y)] = torch.tensor(y) + 1
    return out


@dataclass
class EvalPlan:
    """Batches of test utterance indices per evaluation; for ``batched``, each batch's long
    companion (a waveform of other test utterances, 2–4× the batch's longest member)."""
    batches: Dict[str, List[List[int]]]
    companions: List[np.ndarray]


def eval_plan(test: D.SpeechSplit, batch_size: int, seed: int = 1234) -> EvalPlan:
    rng = np.random.default_rng(seed)
    n = len(test)
    chunks = lambda order: [list(map(int, order[i:i + batch_size])) for i in range(0, n, batch_size)]  # noqa: E731
    batched = chunks(rng.permutation(n))
    companions = []
    for batch in batched:
        target = int(rng.uniform(2, 4) * max(len(test.wave(i)) for i in batch))
        parts, total = [], 0
        while total < target:
            w = test.wave(int(rng.integers(n)))
            parts.append(w)
            total += len(w)
        companions.append(np.concatenate(parts)[:target])
    by_length = np.argsort([len(test.wave(i)) for i in range(n)], kind="stable")
    return EvalPlan(dict(alone=[[i] for i in range(n)], batched=batched, sorted=chunks(by_length)), companions)


# ---------------------------------------------------------------------------- decoding and scoring

def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor) -> List[List[int]]:
    """Best-path CTC decoding: per frame the likeliest token, repeats merged, blanks dropped;
    tokens back to digits."""
    best = logits.argmax(-1)
    out = []
    for row, n in zip(best.tolist(), lengths.tolist()):
        digits, prev = [], None
        for t in row[:n]:
            if t != prev and t != D.BLANK:
                digits.append(t - 1)
            prev = t
        out.append(digits)
    return out


def edit_distance(a: List[int], b: List[int]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def der(hyps: List[List[int]], refs: List[List[int]]) -> float:
    """Digit error rate, percent: total edit distance over total reference digits."""
    return 100.0 * sum(edit_distance(h, r) for h, r in zip(hyps, refs)) / max(1, sum(len(r) for r in refs))


@torch.no_grad()
def decode(model: nn.Module, variant: str, test: Inputs, batches: List[List[int]],
           companions: Optional[List[torch.Tensor]] = None) -> Dict[int, List[int]]:
    """Each test utterance's digits, decoded in eval mode in the given batches (a companion,
    when given, joins its batch last and is not decoded)."""
    model.eval()
    out = {}
    for k, batch in enumerate(batches):
        xs = [test.x[i] for i in batch] + ([companions[k]] if companions is not None else [])
        x, lengths = pad(xs)
        logits = forward(model, variant, x, lengths).logits
        hyps = greedy_decode(logits, input_lengths(model, variant, lengths))
        out.update(zip(batch, hyps))
    return out


def changed_from_alone(hyps: Dict[str, Dict[int, List[int]]]) -> Dict[str, float]:
    r"""Per evaluation, the percentage of test utterances whose decoded digit string differs
    from the one decoded alone: :math:`100 \cdot |\{i : \hat y^e_i \ne \hat y^\text{alone}_i\}| / n`
    (0 for ``alone`` itself). A padding-safe model gives 0 in every evaluation: batching may
    not change what it hears. ``hyps`` maps each evaluation to {utterance: digits}, as
    :func:`evaluate` returns; every evaluation must decode the same utterances."""
    if "alone" not in hyps:
        raise ValueError("hyps: needs the 'alone' decoding to compare with")
    alone = hyps["alone"]
    out = {}
    for name, got in hyps.items():
        if set(got) != set(alone):
            raise ValueError(f"hyps: {name!r} decodes other utterances than 'alone'")
        out[name] = 100.0 * sum(got[i] != alone[i] for i in alone) / max(1, len(alone))
    return out


def evaluate(model: nn.Module, variant: str, test: Inputs, plan: EvalPlan,
             companions: List[torch.Tensor]) -> Tuple[Dict[str, float], Dict[str, Dict[int, List[int]]]]:
    """DER per evaluation, and the decoded digits per evaluation and utterance."""
    ders, hyps = {}, {}
    for name in EVALS:
        got = decode(model, variant, test, plan.batches[name], companions if name == "batched" else None)
        order = sorted(got)
        hyps[name] = got
        ders[name] = der([got[i] for i in order], [test.labels[i] for i in order])
    return ders, hyps


# ---------------------------------------------------------------------------- running statistics

def _batch_norms(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "running_var") and getattr(m, "running_var") is not None]


@torch.no_grad()
def running_stat_gap(model: nn.Module, variant: str, train: Inputs, n: int,
                     batch_size: int = 16) -> Tuple[Optional[float], Optional[float]]:
    """``(gap_μ, gap_σ²)`` (module docstring) averaged over the BatchNorms; None without any.
    The data statistics are those of the BatchNorms' inputs at real frames (each sequence's
    frames at the norm's rate), in eval mode, over the first ``n`` training utterances."""
    norms = _batch_norms(model)
    if not norms:
        return None, None
    model.eval()
    frames: Dict[nn.Module, List[torch.Tensor]] = {m: [] for m in norms}
    current = {}

    def hook(m, args):
        x = args[0]   # (N, C, T)
        keep = torch.arange(x.shape[-1])[None, :] < current["lengths"][:, None]
        frames[m].append(x.transpose(1, 2)[keep].double())

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        idx = sorted(range(min(n, len(train.x))), key=lambda i: train.x[i].shape[0])
        for s in range(0, len(idx), batch_size):
            x, lengths = pad([train.x[i] for i in idx[s:s + batch_size]])
            current["lengths"] = input_lengths(model, variant, lengths)
            forward(model, variant, x, lengths)
    finally:
        for h in handles:
            h.remove()
    gaps_mu, gaps_var = [], []
    for m in norms:
        data = torch.cat(frames[m])
        mu, var = data.mean(0), data.var(0)
        gaps_mu.append(float((m.running_mean.double() - mu).norm() / var.sqrt().norm()))
        gaps_var.append(float((m.running_var.double() - var).norm() / var.norm()))
    return float(np.mean(gaps_mu)), float(np.mean(gaps_var))


# ---------------------------------------------------------------------------- training

def train_model(variant: str, seed: int, cfg: SpeechConfig, train: Inputs, steps: Optional[int] = None,
                on_log: Optional[Callable[[int, float], None]] = None) -> Tuple[nn.Module, List[int], List[float]]:
    """Train ``variant`` from ``seed``: AdamW (weight decay 0.01), one-cycle schedule (10 %
    warm-up, cosine decay), gradients clipped at norm 5, shuffled batches of ``cfg.batch_size``.
    Returns the model and its CTC-loss curve (mean over each ``cfg.log_every`` steps), each
    point also passed to ``on_log(step, loss)``."""
    fam = family(variant)
    steps = steps or (cfg.parakeet_steps if fam == "parakeet" else cfg.wav2vec2_steps)
    lr = cfg.parakeet_lr if fam == "parakeet" else cfg.wav2vec2_lr
    model = build_model(variant, seed, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1,
                                                anneal_strategy="cos")
    rng = np.random.default_rng(seed)
    queue: List[int] = []

    def next_batch() -> List[int]:
        """The next ``batch_size`` indices of shuffled epochs (an epoch's remainder starts the next)."""
        nonlocal queue
        if len(queue) < cfg.batch_size:
            queue = queue + rng.permutation(len(train.x)).tolist()
        batch, queue = queue[:cfg.batch_size], queue[cfg.batch_size:]
        return batch

    curve_steps, curve, window = [], [], []
    for step in range(1, steps + 1):
        idx = next_batch()
        x, lengths = pad([train.x[i] for i in idx])
        model.train()
        loss = forward(model, variant, x, lengths, labels=pad_labels([train.labels[i] for i in idx])).loss
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if step % cfg.log_every == 0 or step == steps:
            curve_steps.append(step)
            curve.append(float(np.mean(window)))
            window = []
            if on_log:
                on_log(step, curve[-1])
    return model.eval(), curve_steps, curve


@functools.lru_cache(maxsize=2)
def load_family(fam: str, cfg_key: Tuple, cache_dir: Optional[str]):
    """(train inputs, test inputs, eval plan, companions' inputs) of a family, once per process."""
    n_train, n_test, data_seed, eval_bs = cfg_key
    train, test, _ = D.load_splits(n_train, n_test, data_seed, cache_dir)
    plan = eval_plan(test, eval_bs)
    return prepare(fam, train), prepare(fam, test), plan, [model_input(fam, w) for w in plan.companions]


def _data_key(cfg: SpeechConfig) -> Tuple:
    return (cfg.n_train, cfg.n_test, cfg.data_seed, cfg.eval_batch_size)


def train_one(variant: str, seed: int, cfg: SpeechConfig, cache_dir: Optional[str] = None) -> SpeechRun:
    """Train and evaluate one (variant, seed): the measured :class:`SpeechRun`."""
    t0, c0 = time.perf_counter(), time.process_time()
    train, test, plan, companions = load_family(family(variant), _data_key(cfg), cache_dir)
    model, curve_steps, curve = train_model(variant, seed, cfg, train)
    ders, hyps = evaluate(model, variant, test, plan, companions)
    gap_mu, gap_var = running_stat_gap(model, variant, train, cfg.stat_utterances)
    tail = curve[-max(1, len(curve) // 10):]
    return SpeechRun(variant, seed, ders, changed_from_alone(hyps), float(np.mean(tail)), gap_mu, gap_var, time.perf_counter() - t0,
                     time.process_time() - c0, curve_steps, curve)


def _one_thread_run(job) -> SpeechRun:
    variant, seed, cfg, cache_dir = job
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_one(variant, seed, cfg, cache_dir)
    finally:
        torch.set_num_threads(before)


def run_all(cfg: SpeechConfig, cache_dir: Optional[str], workers: int = 1,
            on_done: Optional[Callable[[int, int, SpeechRun], None]] = None) -> List[SpeechRun]:
    """Every (variant, seed) run of ``cfg``, in that order, in ``workers`` processes (one torch
    thread each; the data must already be in ``cache_dir``, see :func:`speech_data.load_splits`).
    The longest runs (wav2vec2) are started first so the workers finish together."""
    jobs = [(v, s, cfg, cache_dir) for v in cfg.variants for s in range(cfg.seeds)]
    runs: List[Optional[SpeechRun]] = [None] * len(jobs)

    def done(i: int, run: SpeechRun) -> None:
        runs[i] = run
        if on_done:
            on_done(sum(r is not None for r in runs), len(jobs), run)

    first = sorted(range(len(jobs)), key=lambda i: family(jobs[i][0]) == "parakeet")
    if workers <= 1 or len(jobs) <= 1:
        for i in first:
            done(i, _one_thread_run(jobs[i]))
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(_one_thread_run, jobs[i]): i for i in first}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
    return runs


def summarize(runs: List[SpeechRun]) -> List[Dict]:
    """One row per variant: mean and std over seeds of each DER, batched − alone, the
    percentage of utterances decoded otherwise batched / sorted than alone, the loss and the
    running-statistics gaps."""
    rows = []
    for variant in [v for v in VARIANTS if any(r.variant == v for r in runs)]:
        rs = [r for r in runs if r.variant == variant]
        row = dict(variant=variant, seeds=len(rs))

        def band(vals):
            vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
            return (float(np.mean(vals)), float(np.std(vals))) if vals else None

        for e in EVALS:
            row[e] = band([r.der[e] for r in rs])
        row["batched_minus_alone"] = band([r.der["batched"] - r.der["alone"] for r in rs])
        for e in ("batched", "sorted"):
            row[f"changed_{e}"] = band([r.changed[e] for r in rs])
        row["train_loss"] = band([r.train_loss for r in rs])
        row["rs_mean_gap"] = band([r.rs_mean_gap for r in rs])
        row["rs_var_gap"] = band([r.rs_var_gap for r in rs])
        row["seconds"] = band([r.seconds for r in rs])
        row["cpu_seconds"] = band([r.cpu_seconds for r in rs])
        rows.append(row)
    return rows

