"""The reference's hand-written backward against central finite differences,
and its statistics against the definitions. Everything in float64 NumPy."""

import numpy as np
import pytest

from seqnorm import reference as ref


def numeric_grad(f, a, h=1e-6):
    """Central differences of the scalar f() with respect to array a (in place)."""
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


def poisoned(x, mask):
    """x with NaN at every padded token: nothing may leak from there."""
    x = x.copy()
    if mask is not None:
        x[mask] = np.nan
    return x


CASES = ["nomask", "mask", "full_row"]


def make(case, rng, shape=(3, 4, 5)):
    x = rng.normal(size=shape)
    mask = None
    if case != "nomask":
        mask = rng.random(shape[:-1]) < 0.3
        mask[0, 0] = False
        mask[0, 1] = False
        if case == "full_row":
            mask[1] = True
    return x, mask


def check_grads(forward, backward, x, params, mask, rng):
    """forward(x, *params) -> (y, cache); backward(dy, cache) -> grads for (x, *params)."""
    y, cache = forward(x, *params)
    dy = rng.normal(size=y.shape)
    grads = backward(dy, cache)
    real = np.ones(x.shape[:-1], bool) if mask is None else ~mask

    def loss():
        yy, _ = forward(x, *params)
        return float(np.sum(yy * dy))

    # x: finite differences at real tokens only (pads hold NaN), exact 0 at pads
    x_clean = np.where(real[..., None], x, 0.0)
    xs = x_clean.copy()

    def loss_x():
        yy, _ = forward(np.where(real[..., None], xs, np.nan), *params)
        return float(np.sum(yy * dy))

    num = numeric_grad(loss_x, xs)
    np.testing.assert_allclose(grads[0][real], num[real], rtol=1e-5, atol=1e-7)
    assert np.all(grads[0][~real] == 0.0)
    for g, p in zip(grads[1:], params):
        if p is None:
            assert g is None
            continue
        np.testing.assert_allclose(g, numeric_grad(loss, p), rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(y)) and np.all(y[~real] == 0.0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_backward(case, affine, rng):
    x, mask = make(case, rng)
    w = rng.normal(size=5) if affine else None
    b = rng.normal(size=5) if affine else None
    check_grads(lambda x, w, b: ref.layer_norm_forward(x, w, b, 1e-5, mask),
                ref.layer_norm_backward, poisoned(x, mask), [w, b], mask, rng)


@pytest.mark.parametrize("case", CASES)
def test_rms_norm_backward(case, rng):
    x, mask = make(case, rng)
    check_grads(lambda x, w: ref.rms_norm_forward(x, w, 1e-6, mask),
                ref.rms_norm_backward, poisoned(x, mask), [rng.normal(size=5)], mask, rng)


@pytest.mark.parametrize("center", [True, False])
def test_add_norm_backward(center, rng):
    x, mask = make("mask", rng)
    r = rng.normal(size=x.shape)
    w, b = rng.normal(size=5), (rng.normal(size=5) if center else None)
    y, s, cache = ref.add_norm_forward(x, r, w, b, 1e-5, mask, center=center)
    np.testing.assert_array_equal(s, x + r)
    dy, ds = rng.normal(size=x.shape), rng.normal(size=x.shape)
    dx, dr, dw, db = ref.add_norm_backward(dy, cache, ds)

    def loss():
        yy, ss, _ = ref.add_norm_forward(x, r, w, b, 1e-5, mask, center=center)
        return float(np.sum(yy * dy) + np.sum(ss * ds))

    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dr, numeric_grad(loss, r), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-5, atol=1e-7)
    if center:
        np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_batch_stats", [True, False])
def test_seq_batch_norm_backward(case, use_batch_stats, rng):
    x, mask = make(case, rng)
    rm, rv = rng.normal(size=5), rng.random(5) + 0.5
    check_grads(
        lambda x, w, b: ref.seq_batch_norm_forward(x, w, b, 1e-5, mask, rm, rv, use_batch_stats),
        ref.seq_batch_norm_backward, poisoned(x, mask), [rng.normal(size=5), rng.normal(size=5)], mask, rng)


@pytest.mark.parametrize("case", CASES)
def test_power_norm_exact_backward_without_nu(case, rng):
    x, mask = make(case, rng)
    phi = rng.random(5) + 0.5
    check_grads(lambda x, w, b: ref.power_norm_forward(x, phi, w, b, 1e-5, mask),
                lambda dy, c: ref.power_norm_backward(dy, c, None)[:3],
                poisoned(x, mask), [rng.normal(size=5), rng.normal(size=5)], mask, rng)


def test_power_norm_nu_correction_and_update(rng):
    """Algorithm 1: dx = (g − ν x̂)/√(ψ²+ε); ν ← ν(1 − mΓ) + mΛ over real tokens."""
    x, mask = make("mask", rng)
    phi, nu, w = rng.random(5) + 0.5, rng.normal(size=5), rng.normal(size=5)
    y, cache = ref.power_norm_forward(poisoned(x, mask), phi, w, None, 1e-5, mask)
    dy = rng.normal(size=x.shape)
    dx_exact, _, _, _ = ref.power_norm_backward(dy, cache, None)
    dx, _, _, new_nu = ref.power_norm_backward(dy, cache, nu, factor=0.25)
    real = ~mask
    xr = x[real]                                       # (n, D) real tokens
    xhat = xr / np.sqrt(phi + 1e-5)
    g = dy[real] * w
    np.testing.assert_allclose(dx[real], dx_exact[real] - nu * xhat / np.sqrt(phi + 1e-5))
    assert np.all(dx[mask] == 0)
    gamma, lam = (xhat ** 2).mean(0), (xhat * g).mean(0)
    np.testing.assert_allclose(new_nu, nu * (1 - 0.25 * gamma) + 0.25 * lam)
    np.testing.assert_allclose(cache["batch_phi"], (xr ** 2).mean(0))


def test_statistics_are_two_pass_stable():
    rng = np.random.default_rng(1)
    x = 1e8 + rng.normal(size=(1000, 3))
    n, mean, var = ref.statistics(x, np.ones((1000, 1)), axes=0)
    np.testing.assert_allclose(var[0], x.var(axis=0), rtol=1e-6)


def test_all_padding_gives_zeros_without_nan():
    x = np.full((2, 3, 4), np.nan)
    mask = np.ones((2, 3), bool)
    for y, _ in [ref.layer_norm_forward(x, np.ones(4), np.ones(4), padding_mask=mask),
                 ref.seq_batch_norm_forward(x, np.ones(4), np.ones(4), padding_mask=mask),
                 ref.power_norm_forward(x, np.ones(4), padding_mask=mask)]:
        assert np.all(y == 0)
    _, cache = ref.seq_batch_norm_forward(x, padding_mask=mask)
    assert cache["count"] == 0 and np.all(cache["batch_mean"] == 0)
