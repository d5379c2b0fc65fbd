"""The console script and ``python -m seqnorm``, run for real in a subprocess."""

import shutil
import subprocess
import sys

import pytest
import torch

import seqnorm


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_python_m_seqnorm_explains_the_note():
    out = run(sys.executable, "-m", "seqnorm")
    assert out.returncode == 0, out.stderr
    for text in ("μ = 1.75, σ² = 0.6875, σ = 0.8292", "μ = 1.5, σ² = 0.25", "(1 − 1.5)/√0.25 = −1"):
        assert text in out.stdout, text


@pytest.mark.skipif(shutil.which("seqnorm") is None, reason="package not installed (pip install -e .)")
def test_console_script_version_and_help():
    out = run("seqnorm", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"seqnorm {seqnorm.__version__}"
    out = run("seqnorm", "--help")
    assert out.returncode == 0 and "usage: seqnorm" in out.stdout and "explain" in out.stdout
    out = run("seqnorm", "no-such-command")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_bench_smoke_and_bad_arguments(tmp_path, capsys):
    """`seqnorm bench` on a tiny shape: the table, the copy bandwidth, the markdown file."""
    from seqnorm.cli import main

    md = tmp_path / "r.md"
    rc = main(["bench", "--shapes", "2,8,16", "--dtypes", "fp32", "--ops", "layer_norm,seq_batch_norm,group_norm",
               "--modes", "fwd,fwd+bwd", "--budget", "0.01", "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "copy bandwidth" in out and "layer_norm" in out and "gather" in out
    text = md.read_text()
    assert "| seq_batch_norm | (2, 8, 16) | fp32 | fwd+bwd | seqnorm |" in text
    assert "| group_norm | (2, 8, 16) | fp32 | fwd+bwd | seqnorm |" in text    # shape B,T,C
    bads = [["--shapes", "2,8"], ["--ops", "batch_norm"], ["--dtypes", "fp8"], ["--modes", "bwd"]]
    if not torch.cuda.is_available():
        bads.append(["--device", "cuda"])
    for bad in bads:
        assert main(["bench", *bad]) == 2
        assert "seqnorm bench: error:" in capsys.readouterr().err
