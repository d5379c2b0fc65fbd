"""``seqnorm explain`` end to end: the real console script in a subprocess (and, where a test
runs it many times, the same entry point in this process: :func:`explain_here`)."""

import contextlib
import io
import json
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

from seqnorm import reference as ref
from seqnorm.commands.explain import compute_lesson, render_markdown, render_text


def explain(*args):
    return subprocess.run([sys.executable, "-m", "seqnorm", "explain", *args],
                          capture_output=True, text=True, timeout=120)


def explain_here(*args):
    """``explain`` through ``seqnorm.cli.main`` in this process (no interpreter and torch import):
    the same ``returncode``/``stdout``/``stderr``."""
    from seqnorm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["explain", *args])
        except SystemExit as e:
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_default_run_is_the_note():
    out = explain()
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # BN of the 2x2 matrix: column statistics and the substitutions
    assert "feature 0 pools 2 tokens (0 1): μ = 2, σ² = 1, σ = 1" in text
    assert "(1 − 2)/√1 = −1   (3 − 2)/√1 = 1" in text
    # LN of the 2x2 matrix
    assert "token 0: μ = 1.5, σ² = 0.25, σ = 0.5" in text
    assert "(1 − 1.5)/√0.25 = −1   (2 − 1.5)/√0.25 = 1" in text
    # the batch of two sentences, labelled
    assert "feature 0 pools 4 tokens (你 好 谢 谢): μ = 1.75, σ² = 0.6875, σ = 0.8292" in text
    assert "token 你: μ = 1.5" in text and "token 谢: μ = 2.5" in text
    # with padding: both BNs and how far each real token moved
    assert "BatchNorm, padding pooled" in text and "BatchNorm, padding excluded" in text
    assert "moved each real token's BatchNorm output" in text
    assert "\x1b[" not in text  # no colour when stdout is not a terminal


def _random_case(seed):
    rng = np.random.default_rng(seed)
    b, t, d = rng.integers(1, 4), rng.integers(2, 5), rng.integers(1, 4)
    x = np.round(rng.normal(size=(b, t, d)) * 3, 3)
    mask = rng.random((b, t)) < 0.3
    mask[0, :2] = False
    return x, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_output_matches_the_reference(seed):
    x, mask = _random_case(seed)
    out = explain("--x", json.dumps(x.tolist()), "--padding-mask", json.dumps(mask.tolist()),
                  "--eps", "1e-5", "--format", "json")
    assert out.returncode == 0, out.stderr
    (lesson,) = json.loads(out.stdout)["lessons"]
    by = {n["norm"]: n for n in lesson["norms"]}
    assert set(by) == {"layer", "masked_batch", "pooled_batch", "rms", "power"} if mask.any() else {"layer", "masked_batch", "rms", "power"}
    y, c = ref.layer_norm_forward(x, eps=1e-5, padding_mask=mask)
    np.testing.assert_allclose(by["layer"]["output"], y, rtol=1e-12)
    real = [(bi, ti) for bi in range(x.shape[0]) for ti in range(x.shape[1]) if not mask[bi, ti]]
    assert len(by["layer"]["groups"]) == len(real)
    for g, (bi, ti) in zip(by["layer"]["groups"], real):
        assert g["mean"] == pytest.approx(c["mean"][bi, ti, 0])
        assert g["var"] == pytest.approx(c["var"][bi, ti, 0])
        assert g["std"] == pytest.approx(np.sqrt(c["var"][bi, ti, 0]))
        assert g["members"] == [[bi, ti, di] for di in range(x.shape[2])]
    y, c = ref.seq_batch_norm_forward(x, eps=1e-5, padding_mask=mask)
    np.testing.assert_allclose(by["masked_batch"]["output"], y, rtol=1e-12)
    for di, g in enumerate(by["masked_batch"]["groups"]):
        assert g["mean"] == pytest.approx(c["batch_mean"][di])
        assert g["var"] == pytest.approx(c["batch_var"][di])
        assert len(g["members"]) == len(real)   # padding never pooled
    y, _ = ref.rms_norm_forward(x, eps=1e-5, padding_mask=mask)
    np.testing.assert_allclose(by["rms"]["output"], y, rtol=1e-12)
    if mask.any():
        y, c = ref.seq_batch_norm_forward(x, eps=1e-5)
        np.testing.assert_allclose(by["pooled_batch"]["output"], y, rtol=1e-12)
        assert len(by["pooled_batch"]["groups"][0]["members"]) == x.shape[0] * x.shape[1]
        moved = np.abs(np.asarray(by["pooled_batch"]["output"]) - by["masked_batch"]["output"]) * (~mask)[..., None]
        np.testing.assert_allclose(lesson["padding_moved"], moved, rtol=1e-12)


def _png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_and_svg(tmp_path):
    png, svg = tmp_path / "note.png", tmp_path / "note.svg"
    out = explain("--png", str(png), "--svg", str(svg))
    assert out.returncode == 0, out.stderr
    w, h = _png_size(png.read_bytes())
    assert 400 <= w <= 4000 and 300 <= h <= 4000
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(png))
    assert pixels.std() > 0.05                          # not blank
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20
    assert "<svg" in svg.read_text()


def test_figure_degrades_without_a_cjk_font(tmp_path, monkeypatch):
    from seqnorm.commands.explain import figure

    monkeypatch.setattr(figure, "_cjk_font", lambda: None)
    lesson = compute_lesson([[[1, 2], [3, 4]]], tokens=[["你", "好"]], norms=("layer",))
    figure.draw(lesson, str(tmp_path / "x.png"))
    assert _png_size((tmp_path / "x.png").read_bytes())[0] > 100


def test_markdown_and_inputs_from_files(tmp_path):
    x = np.array([[1.0, 2.0, 4.0], [3.0, 4.0, 0.5]])
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    (tmp_path / "x.json").write_text(json.dumps(x.tolist()))
    outs = [explain_here("--file", str(tmp_path / f"x.{ext}"), "--format", "json") for ext in ("npy", "csv", "json")]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout
    md = explain_here("--x", json.dumps(x.tolist()), "--format", "markdown", "--norm", "layer",
                 "--tokens", "a b")
    assert md.returncode == 0
    assert "### LayerNorm" in md.stdout and "| token | d0 | d1 | d2 |" in md.stdout
    assert "| token a |" in md.stdout


def test_lengths_and_tokens():
    out = explain("--x", "[[[1,2],[3,4],[9,9]],[[2,3],[1,4],[5,6]]]", "--lengths", "2,3",
                  "--tokens", "你 好 PAD / 谢 谢 呢", "--norm", "batch")
    assert out.returncode == 0, out.stderr
    assert "feature 0 pools 5 tokens (你 好 谢 谢 呢)" in out.stdout
    assert "feature 0 pools 6 tokens" in out.stdout   # the pooled BN, pad included
    assert "PAD" in out.stdout and "(padding)" in out.stdout


@pytest.mark.parametrize("args,expected", [
    (["--x", "[[1, 2], [3]]"], "--x: ragged nested list"),
    (["--x", '[[1, "a"], [3, 4]]'], '--x: expected numbers, found "a"'),
    (["--x", "[[1, 2], [3, 4"], "--x: not valid JSON"),
    (["--x", "[[[[1]]]]"], "--x: expected a 2-D (T, D) or 3-D (B, T, D) tensor, got 4-D"),
    (["--x", "[1, 2]"], "got 1-D"),
    (["--x", "[[1, NaN], [3, 4]]"], "--x: contains NaN or Inf"),
    (["--x", "[[[1,2],[3,4]]]", "--padding-mask", "[[true, false, false]]"],
     "--padding-mask: shape (1, 3) does not match the input's tokens (B, T) = (1, 2)"),
    (["--x", "[[1,2],[3,4]]", "--padding-mask", "[1, 0]"], "--padding-mask: expected a JSON list of true/false"),
    (["--x", "[[1,2],[3,4]]", "--lengths", "3"], "--lengths: each length must lie in [0, 2]"),
    (["--x", "[[1,2],[3,4]]", "--padding-mask", "[[true], [true, false]]"], "--padding-mask: expected a JSON list"),
    (["--x", "[[1,2],[3,4]]", "--tokens", '[["a", "b"], "c"]'], "--tokens: mix of lists and labels"),
    (["--x", "[[1,2],[3,4]]", "--lengths", "x"], "--lengths: expected integers"),
    (["--file", "/nonexistent/x.npy"], "--file: no such file: /nonexistent/x.npy"),
    (["--x", "[[1,1],[2,2]]", "--norm", "layer"], "--eps: a layer group has zero variance"),
    (["--x", "[[1,2],[3,4]]", "--eps", "-1"], "--eps: expected a finite number"),
    (["--x", "[[1,2],[3,4]]", "--tokens", "a b c"], "--tokens: expected 1 sentence(s) of 2 token(s)"),
    (["--norm", "group"], "invalid choice: 'group'"),
    (["--png", "/nonexistent/dir/x.png"], "no such directory"),
])
def test_bad_input_exits_2_with_one_line(args, expected, capsys):
    """Three cases through the console script in a subprocess (what the user sees: no traceback),
    the rest through the same entry point in this process (no interpreter and torch import each)."""
    if args[0] in ("--file", "--norm") or "NaN" in args[-1]:
        out = explain(*args)
        code, err = out.returncode, out.stderr
    else:
        from seqnorm.cli import main

        try:
            code = main(["explain", *args])
        except SystemExit as e:   # argparse's own exit
            code = e.code
        err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0]


def test_renderers_in_process():
    lesson = compute_lesson([[1.0, 2.0], [3.0, 4.0]], eps=0.0, norms=("layer", "batch"))
    text = render_text(lesson, color=True)
    assert "\x1b[1m" in text and "μ = 1.5" in text
    assert "|---|" in render_markdown(lesson)
    with pytest.raises(ValueError, match="norm must be one of"):
        compute_lesson([[1.0, 2.0]], norms=("group",))


DEEP = "[" * 10_000 + "]" * 10_000


def test_deeply_nested_json_is_one_line_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(DEEP)
    for args, option in ((["--x", DEEP], "--x"), (["--file", str(path)], "--file"),
                         (["--x", "[" * 40 + "1" + "]" * 40], "--x")):
        out = explain(*args) if option == "--file" else explain_here(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{option}: nested" in lines[0] and "deep" in lines[0], out.stderr


def test_a_large_matrix_prints_one_line_unless_no_limit(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.arange(300 * 300, dtype=np.float64).reshape(300, 300) % 7)
    out = explain("--file", str(path))
    assert out.returncode == 2 and out.stdout == "", out.stdout[:200]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "300 tokens × 300 features" in lines[0] and "--no-limit" in lines[0]
    wide = json.dumps((np.arange(3 * 70).reshape(3, 70) % 5).tolist())
    assert explain_here("--x", wide, "--norm", "layer").returncode == 2
    full = explain_here("--x", wide, "--norm", "layer", "--no-limit")
    assert full.returncode == 0 and "token 2:" in full.stdout


def test_png_without_matplotlib_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from seqnorm.cli import main; "
            f"sys.exit(main(['explain', '--png', {str(tmp_path / 'x.png')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "seqnorm[explain]" in lines[0]
    assert not (tmp_path / "x.png").exists()
