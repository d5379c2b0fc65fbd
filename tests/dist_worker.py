"""Worker for tests/test_distributed.py: runs in each spawned process (gloo, CPU)."""

import importlib.util
import os
import sys
import warnings

import torch
import torch.distributed as dist

import seqnorm

D = 6


def global_batches():
    """Per rank: a list of (x, padding_mask, dy) — two steps, different sizes, lengths, padding."""
    g = torch.Generator().manual_seed(0)

    def make(b, t, lengths):
        x = torch.randn(b, t, D, generator=g, dtype=torch.float64) * 3 + 1
        mask = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]
        x[mask] = float("nan")  # padding must never leak
        return x, mask, torch.randn(b, t, D, generator=g, dtype=torch.float64)

    scenarios = {
        "ragged": [[make(3, 5, [5, 2, 4]), make(2, 7, [7, 1])], [make(1, 4, [4]), make(4, 2, [2, 2, 1, 0])]],
        "rank1_all_padding": [[make(2, 4, [4, 3]), make(3, 5, [0, 0, 0])],
                              [make(2, 3, [3, 3]), make(1, 6, [0])]],
    }
    return scenarios


def ddp_data():
    """Eight steps on one fixed global batch (so that the loss must fall)."""
    g = torch.Generator().manual_seed(1)
    per_rank = []
    for b, t in ((3, 5), (2, 7)):
        x = torch.randn(b, t, D, generator=g, dtype=torch.float64)
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None, :] >= lengths[:, None]
        target = x[..., :1] * 2 - x[..., 1:2]  # learnable from the input
        per_rank.append((x, mask, target))
    return [per_rank] * 8


def make_model(norm="batch"):
    """The DDP test's model with a SeqBatchNorm (``"batch"``) or a PowerNorm (``"power"``)."""
    torch.manual_seed(2)
    return Model(norm).double()


class Model(torch.nn.Module):
    def __init__(self, norm="batch"):
        super().__init__()
        self.inp = torch.nn.Linear(D, D)
        self.norm = seqnorm.SeqBatchNorm(D) if norm == "batch" else seqnorm.PowerNorm(D)
        self.out = torch.nn.Linear(D, 1)

    def forward(self, x, mask):
        return self.out(torch.relu(self.norm(self.inp(x.masked_fill(mask[..., None], 0)), padding_mask=mask)))


# The sync modules under test: (kind, momentum) → results key prefix.
#: whether the triton backend's sync path runs too (TRITON_INTERPRET comes from the parent's environment)
TRITON = importlib.util.find_spec("triton") is not None

CASES = {"batch": ("batch", 0.1), "power": ("power", 0.1), "power_cumulative": ("power", None)}
BUFFERS = {"batch": ("running_mean", "running_var"), "power": ("running_phi", "running_nu")}


def make_norm(kind, sync, momentum=0.1):
    """SeqBatchNorm / PowerNorm, or their Sync versions, with fixed affine parameters
    (and for PowerNorm a ψ² and ν that are not the defaults)."""
    cls = {("batch", False): seqnorm.SeqBatchNorm, ("batch", True): seqnorm.SyncSeqBatchNorm,
           ("power", False): seqnorm.PowerNorm, ("power", True): seqnorm.SyncPowerNorm}[kind, sync]
    norm = cls(D, momentum=momentum).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, D))
        norm.bias.copy_(torch.linspace(-1, 1, D))
        if kind == "power":
            norm.running_phi.copy_(torch.linspace(0.5, 2.0, D))
            norm.running_nu.copy_(torch.linspace(-0.1, 0.1, D))
    return norm


def concat_batch(parts):
    """Concatenate per-rank (B_r, T_r, ...) tensors along B, padding T to the longest
    (with padding: True in a mask, 0 elsewhere)."""
    t = max(p.shape[1] for p in parts)
    out = []
    for p in parts:
        pad_shape = (p.shape[0], t - p.shape[1]) + tuple(p.shape[2:])
        fill = torch.ones(pad_shape, dtype=p.dtype) if p.dtype == torch.bool else torch.zeros(pad_shape, dtype=p.dtype)
        out.append(torch.cat([p, fill], dim=1))
    return torch.cat(out, dim=0)


def run_steps(norm, kind, steps, rank=None, dy_scale=1.0):
    """Forward and backward of ``norm`` on each step — rank ``rank``'s part, or with
    ``rank=None`` the concatenated global batch — recording what it gave and kept."""
    record = []
    for per_rank in steps:
        if rank is None:
            x, mask, dy = (concat_batch(list(t)) for t in zip(*per_rank))
        else:
            x, mask, dy = per_rank[rank]
        x = x.clone().requires_grad_()
        norm.zero_grad()
        y = norm(x, padding_mask=mask)
        y.backward(dy * dy_scale)
        record.append(dict(y=y.detach(), dx=x.grad, dw=norm.weight.grad.clone(), db=norm.bias.grad.clone(),
                           nbt=norm.num_batches_tracked.clone(),
                           **{b: getattr(norm, b).clone() for b in BUFFERS[kind]}))
    return record


#: the cases the float32 run on the triton kernels covers (the interpreter is slow; a
#: cumulative momentum takes the same kernels with a given factor on the host policy)
TRITON32_CASES = ("batch", "power")


def _sync_steps(rank, results, prefix="", dtype=torch.float64, cases=tuple(CASES)):
    """Every sync module of ``cases`` on every scenario: what this rank got, step by step
    (the module and the data in ``dtype``: float32 takes the triton backend's kernels)."""
    for case in cases:
        kind, momentum = CASES[case]
        for name, steps in global_batches().items():
            steps = [[(x.to(dtype), m, dy.to(dtype)) for x, m, dy in per_rank] for per_rank in steps]
            results[f"{prefix}{case}/{name}"] = run_steps(make_norm(kind, True, momentum).to(dtype), kind, steps,
                                                          rank)


def _ddp_run(rank, world, norm):
    """A short DistributedDataParallel run of the model with its norm made sync: per-rank
    loss scaled so that DDP's gradient average equals the gradient of the global mean loss."""
    model = make_model(norm)
    model = (seqnorm.SyncSeqBatchNorm.convert_sync_batchnorm(model) if norm == "batch"
             else seqnorm.SyncPowerNorm.convert_sync_powernorm(model))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    losses = []
    for per_rank in ddp_data():
        total = sum(int((~m).sum()) for _, m, _ in per_rank)
        x, mask, target = per_rank[rank]
        opt.zero_grad()
        pred = ddp(x, mask)
        err = ((pred - target) ** 2).masked_fill(mask[..., None], 0).sum()
        (err * world / total).backward()
        opt.step()
        t = torch.tensor([err.item()], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / total)
    return dict(losses=losses, params={k: v.detach().clone() for k, v in model.state_dict().items()})


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sync_steps(rank, results)
    results["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    if TRITON:   # the same steps on the triton backend's kernels (through the interpreter without a GPU)
        with seqnorm.use_backend("triton"):
            _sync_steps(rank, results, prefix="triton/")
            # float32: the kernels' own sync path (each rank's partials all-gathered whole, one finalize)
            _sync_steps(rank, results, prefix="triton32/", dtype=torch.float32, cases=TRITON32_CASES)

    for norm in ("batch", "power"):
        results[f"ddp/{norm}"] = _ddp_run(rank, world, norm)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Let no rank leave while the other may still be talking to it.
    dist.barrier()
    dist.destroy_process_group()
    # Leave without finalizing the interpreter. A gloo worker thread can drop its last
    # finished work (and the Python-owned tensors in it) after finalization has begun;
    # taking the GIL then kills the thread inside C++ and the process aborts with
    # "terminate called without an active exception" (SIGABRT; seen in CI about once
    # in 10-60 runs, core dump: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork ->
    # TensorImpl::decref_pyobject -> take_gil -> pthread_exit). A torch teardown race,
    # not a seqnorm one; the results are on disk, so exit now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
