"""`seqnorm compare` end to end on a tiny configuration (seconds), and its errors."""

import csv
import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest

from seqnorm.commands.compare import compute as C, report as R
from seqnorm.commands.compare import tasks as T


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "seqnorm", "compare", *args], capture_output=True, text=True,
                          timeout=300)


def test_tiny_compare_writes_table_csv_json_and_plots(tmp_path):
    out = tmp_path / "cmp"
    res = run_cli("--tasks", "majority,wordorder", "--norms", "layer,batch,masked_batch,power", "--seeds", "2",
                  "--steps", "4", "--data-scale", "0.05", "--out", str(out))
    assert res.returncode == 0, res.stderr
    header = res.stdout.splitlines()[0]
    for col in R.HEADERS:
        assert col in header, col
    assert len(res.stdout.strip().splitlines()) == 1 + 2 * 4      # a row per (task, norm)
    with open(out / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 4 * 2                                # every run
    assert {r["norm"] for r in rows} == {"layer", "pooled_batch", "masked_batch", "power"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["steps"] == 4 and len(summary["runs"]) == 16
    assert "| task | norm | val acc % |" in (out / "summary.md").read_text()
    for png in ("curves.png", "fluctuation.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "runs in" in res.stderr                                # the closing progress line


def test_markdown_and_json_formats(tmp_path):
    res = run_cli("--tasks", "majority", "--norms", "rms", "--seeds", "1", "--steps", "2", "--data-scale", "0.05",
                  "--out", str(tmp_path / "a"), "--format", "json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert rows[0]["norm"] == "rms" and 0 <= rows[0]["val_acc"][0] <= 1


def test_fixed_seeds_give_the_same_numbers():
    cfg = C.Config(tasks=["majority"], norms=["masked_batch"], seeds=1, steps=5, data_scale=0.05, eval_every=5)
    task = T.load("majority", cfg.data_scale)
    a = C.train_one(task, "masked_batch", 0, cfg)
    b = C.train_one(task, "masked_batch", 0, cfg)
    assert a.curve_acc == b.curve_acc and a.fluct_var_curve == b.fluct_var_curve and a.acc_bs1 == b.acc_bs1


def test_parallel_workers_give_the_serial_results():
    """Two worker processes (one torch thread each) reproduce a serial run exactly, in the same order."""
    cfg = C.Config(tasks=["majority"], norms=["layer", "masked_batch", "power"], seeds=2, steps=4,
                   data_scale=0.05, eval_every=2)
    done = []
    serial = C.run_all(cfg, workers=1)
    parallel = C.run_all(cfg, workers=2, on_done=lambda k, total, run: done.append((k, total)))
    assert [(r.norm, r.seed) for r in parallel] == [(r.norm, r.seed) for r in serial]
    for a, b in zip(serial, parallel):
        a, b = asdict(a), asdict(b)
        a.pop("seconds"), b.pop("seconds")
        np.testing.assert_equal(a, b)        # every metric and curve, bit for bit (NaN = NaN)
    assert sorted(done) == [(k, 6) for k in range(1, 7)]


def test_tasks_are_deterministic_and_variable_length():
    a, b = T.load("majority", 0.1, seed=3), T.load("majority", 0.1, seed=3)
    assert np.array_equal(a.train.tokens.numpy(), b.train.tokens.numpy())
    lengths = a.train.lengths
    assert lengths.min() <= 5 and lengths.max() >= 50                 # lengths vary widely
    w = T.load("wordorder", 0.2)
    assert set(w.train.labels.tolist()) == {0, 1} and w.train.lengths.max() > 3 * w.train.lengths.min()


@pytest.mark.parametrize("args,expected", [
    (["--norms", "layer,group"], "--norms: unknown norm group"),
    (["--seeds", "0"], "--seeds: must be at least 1, got 0"),
    (["--tasks", "imdb"], "--tasks: unknown task"),
    (["--data-scale", "2"], "--data-scale: must lie in (0, 1]"),
    (["--layers", "0"], "--layers: must be at least 1, got 0"),
    (["--d-model", "33"], "--d-model: must be a multiple of the 2 heads, got 33"),
    (["--out", "/proc/version/out"], "--out: cannot write to /proc/version/out"),
])
def test_bad_arguments_exit_2_with_one_line(args, expected, capsys):
    """Two cases through the console script in a subprocess, the rest in this process (same entry point)."""
    if args[0] in ("--norms", "--out"):
        res = run_cli(*args)
        code, err = res.returncode, res.stderr
    else:
        from seqnorm.cli import main

        try:
            code = main(["compare", *args])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err


def test_row_wise_norms_do_not_depend_on_the_batch_and_only_batch_norms_fluctuate():
    """LayerNorm's accuracy is the same in eval mode, train mode, bucketed batches and at batch
    size 1 (exactly: its statistics are per token); masked BN's batch statistics are measured."""
    cfg = C.Config(tasks=["majority"], seeds=1, steps=6, data_scale=0.05, eval_every=3)
    task = T.load("majority", cfg.data_scale)
    ln = C.train_one(task, "layer", 0, cfg)
    assert ln.val_acc == ln.train_mode_acc == ln.acc_bucketed == ln.acc_bs1
    assert ln.fluct_var is None and ln.fluct_steps == []
    bn = C.train_one(task, "masked_batch", 0, cfg)
    assert len(bn.fluct_steps) == 6 and all(v > 0 for v in bn.fluct_mean_curve + bn.fluct_rel_curve)
    pn = C.train_one(task, "power", 0, cfg)
    assert pn.fluct_mean is None and pn.fluct_rel > 0       # PowerNorm keeps no mean, only ψ²
