"""Augmentation on the device (semantics §2): normalisation, flip, reflect-pad crop, rotation, and their draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lop_jax.augment as aug
from lop_jax.augment import augment, crop, flip, normalize, rotate

MEAN = np.array([0.5071, 0.4865, 0.4409])
STD = np.array([0.2673, 0.2564, 0.2762])


def _images(b=3, h=32, w=32, c=3, seed=0):
    return np.random.default_rng(seed).normal(size=(b, h, w, c)).astype(np.float32)


def _rotate_reference(img, degrees):
    """torchvision-style nearest-neighbour rotation (counter-clockwise, fill 0), in float64.

    Returns the output and a mask of pixels whose source coordinate is not within 1e-4 of a
    rounding tie (where float32 and float64 may legitimately round differently)."""
    h, w = img.shape[:2]
    t = np.deg2rad(degrees)
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    # inverse map: visual coordinates have y up, so an output point rotated back by -θ
    x_in = np.cos(t) * xx - np.sin(t) * yy + (w - 1) / 2
    y_in = np.sin(t) * xx + np.cos(t) * yy + (h - 1) / 2
    xi, yi = np.rint(x_in).astype(int), np.rint(y_in).astype(int)
    valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = np.where(valid[..., None], img[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)], 0)
    safe = (np.abs(np.abs(x_in % 1) - 0.5) > 1e-4) & (np.abs(np.abs(y_in % 1) - 0.5) > 1e-4)
    return out, safe


# ---------------------------------------------------------------------------------------------
# normalisation


def test_normalize():
    raw = np.random.default_rng(1).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    raw[0, 0, 0] = [0, 255, 128]
    got = np.asarray(normalize(raw))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, (raw / 255.0 - MEAN) / STD, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0, 0, 0], [(0 - 0.5071) / 0.2673, (1 - 0.4865) / 0.2564,
                                              (128 / 255 - 0.4409) / 0.2762], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# rotation


def test_rotate_by_zero_is_identity():
    x = _images(4)
    np.testing.assert_array_equal(np.asarray(rotate(jnp.asarray(x), jnp.zeros(4))), x)


@pytest.mark.parametrize("size", [32, 5, 4])
def test_rotate_by_90_is_an_exact_counter_clockwise_quarter_turn(size):
    x = _images(2, size, size, 3)
    got = np.asarray(rotate(jnp.asarray(x), jnp.full((2,), 90.0)))
    # np.rot90 with k=1 turns a displayed image counter-clockwise: out[0, 0] = in[0, -1]
    np.testing.assert_array_equal(got, np.rot90(x, k=1, axes=(1, 2)))
    assert got[0, 0, 0, 0] == x[0, 0, -1, 0]


def test_rotate_45_fills_corners_with_zero():
    x = jnp.full((1, 32, 32, 3), 5.0)
    got = np.asarray(rotate(x, jnp.array([45.0])))[0]
    for r, c in ((0, 0), (0, 31), (31, 0), (31, 31)):
        np.testing.assert_array_equal(got[r, c], 0.0)
    assert np.all(got[8:24, 8:24] == 5.0)
    assert set(np.unique(got)) == {0.0, 5.0}
    # the rotated square overlaps the original in an octagon of 2(√2 − 1) ≈ 83 % of the area
    lost = np.mean(got[..., 0] == 0)
    assert 0.1 < lost < 0.25


def test_rotate_matches_nearest_neighbour_reference_per_image_angle():
    x = _images(4, 8, 8, 2, seed=3)
    angles = np.array([3.0, 7.5, 12.0, 15.0], np.float32)
    got = np.asarray(rotate(jnp.asarray(x), jnp.asarray(angles)))
    for i, a in enumerate(angles):
        want, safe = _rotate_reference(x[i], float(a))
        assert safe.mean() > 0.8
        np.testing.assert_array_equal(got[i][safe], want[safe], err_msg=f"angle {a}")


def test_rotate_is_counter_clockwise_for_small_angles():
    # a bright blob right of the centre moves up (towards row 0) under a counter-clockwise turn
    x = np.zeros((1, 33, 33, 1), np.float32)
    x[0, 15:18, 27:30, 0] = 1.0  # centred 12 pixels right of the centre (16, 16)
    got = np.asarray(rotate(jnp.asarray(x), jnp.array([15.0])))[0, ..., 0]
    r, c = np.argwhere(got == 1.0).mean(axis=0)
    t = np.deg2rad(15)
    assert abs(r - (16 - 12 * np.sin(t))) < 0.75 and abs(c - (16 + 12 * np.cos(t))) < 0.75, (r, c)


# ---------------------------------------------------------------------------------------------
# flip and crop, exact


def test_flip_exact():
    x = _images(3, 4, 5, 2)
    got = np.asarray(flip(jnp.asarray(x), jnp.array([True, False, True])))
    np.testing.assert_array_equal(got[0], x[0, :, ::-1])
    np.testing.assert_array_equal(got[1], x[1])
    np.testing.assert_array_equal(got[2], x[2, :, ::-1])
    np.testing.assert_array_equal(got[0, :, 0], x[0, :, 4])


def test_crop_reflect_padding_hand_computed():
    # 8×8 image with value 10·row + col; reflect padding by 4 does not repeat the edge pixel:
    # padded index i maps to original |i − 4| reflected at 7 (…, 2, 1, 0, 1, 2, …, 6, 7, 6, 5, …).
    img = (10 * np.arange(8)[:, None] + np.arange(8)[None, :]).astype(np.float32)
    x = jnp.asarray(img[None, :, :, None].repeat(3, axis=0))
    offsets = jnp.array([[0, 8], [4, 4], [8, 1]])
    got = np.asarray(crop(x, offsets))[..., 0]
    rows = {0: [4, 3, 2, 1, 0, 1, 2, 3], 4: [0, 1, 2, 3, 4, 5, 6, 7], 8: [4, 5, 6, 7, 6, 5, 4, 3]}
    cols = {8: [4, 5, 6, 7, 6, 5, 4, 3], 4: [0, 1, 2, 3, 4, 5, 6, 7], 1: [3, 2, 1, 0, 1, 2, 3, 4]}
    for i, (r, c) in enumerate([(0, 8), (4, 4), (8, 1)]):
        want = 10 * np.array(rows[r])[:, None] + np.array(cols[c])[None, :]
        np.testing.assert_array_equal(got[i], want, err_msg=f"offset {(r, c)}")


def test_crop_32_matches_numpy_reflect_pad():
    x = _images(9, 32, 32, 3, seed=5)
    offsets = np.array([[0, 0], [0, 8], [8, 0], [8, 8], [4, 4], [1, 7], [3, 2], [6, 5], [2, 8]])
    got = np.asarray(crop(jnp.asarray(x), jnp.asarray(offsets)))
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    for i, (r, c) in enumerate(offsets):
        np.testing.assert_array_equal(got[i], padded[i, r:r + 32, c:c + 32])
    np.testing.assert_array_equal(got[4], x[4])  # offset (4, 4) is the identity


# ---------------------------------------------------------------------------------------------
# the random draws of augment (recorded by spies on the three routines)


@pytest.fixture
def spied(monkeypatch):
    calls = []

    def spy(name):
        def f(images, param):
            calls.append((name, np.asarray(param)))
            return images
        return f

    for name in ("flip", "crop", "rotate"):
        monkeypatch.setattr(aug, name, spy(name))
    return calls


def test_augment_draws(spied):
    n = 9000
    augment(jax.random.PRNGKey(123), jnp.zeros((n, 1, 1, 1)))
    assert [c[0] for c in spied] == ["flip", "crop", "rotate"]  # the order of semantics §2
    do_flip, offsets, degrees = (c[1] for c in spied)
    # flip with p = 0.5
    assert do_flip.shape == (n,) and do_flip.dtype == np.bool_
    assert 0.47 < do_flip.mean() < 0.53
    # crop offsets uniform over 0..8 for rows and columns
    assert offsets.shape == (n, 2)
    for axis in (0, 1):
        counts = np.bincount(offsets[:, axis], minlength=9)
        assert counts.size == 9 and offsets[:, axis].min() == 0
        assert np.all((counts > 0.85 * n / 9) & (counts < 1.15 * n / 9)), counts
    assert abs(np.corrcoef(offsets[:, 0], offsets[:, 1])[0, 1]) < 0.05
    # angles uniform over [0, 15] degrees, only positive (counter-clockwise)
    assert degrees.shape == (n,)
    assert degrees.min() >= 0.0 and degrees.max() <= 15.0
    assert degrees.min() < 0.1 and degrees.max() > 14.9
    counts = np.histogram(degrees, bins=5, range=(0, 15))[0]
    assert np.all((counts > 0.9 * n / 5) & (counts < 1.1 * n / 5)), counts
    # independent draws: flips and angles uncorrelated
    assert abs(np.corrcoef(do_flip, degrees)[0, 1]) < 0.05


@pytest.fixture(scope="module")
def augment_jit():
    return jax.jit(augment)


def test_augment_exact_for_fixed_key(monkeypatch, augment_jit):
    x = _images(6, 32, 32, 3, seed=7)
    key = jax.random.PRNGKey(42)
    out = np.asarray(augment_jit(key, jnp.asarray(x)))
    # same key, same bits (jitted or not); another key, another output
    np.testing.assert_array_equal(out, np.asarray(augment_jit(key, jnp.asarray(x))))
    np.testing.assert_array_equal(out, np.asarray(augment(key, jnp.asarray(x))))
    assert not np.array_equal(out, np.asarray(augment_jit(jax.random.PRNGKey(43), jnp.asarray(x))))
    # record the draws for this key, then rebuild the output in numpy: flip → reflect crop → rotate
    calls = []

    def spy(name, real):
        def f(images, param):
            calls.append(np.asarray(param))
            return real(images, param)
        return f

    for name in ("flip", "crop", "rotate"):
        monkeypatch.setattr(aug, name, spy(name, getattr(aug, name)))
    augment(key, jnp.asarray(x))
    do_flip, offsets, degrees = calls
    want = np.where(do_flip[:, None, None, None], x[:, :, ::-1], x)
    padded = np.pad(want, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    want = np.stack([padded[i, r:r + 32, c:c + 32] for i, (r, c) in enumerate(offsets)])
    for i in range(6):
        ref, safe = _rotate_reference(want[i], float(degrees[i]))
        np.testing.assert_array_equal(out[i][safe], ref[safe], err_msg=f"image {i}")
    # rotation fills the corners of (almost) every image with exact zeros unless the angle is tiny
    for i in range(6):
        if degrees[i] > 3:
            assert out[i, 0, 0, 0] == 0 or out[i, 31, 31, 0] == 0
