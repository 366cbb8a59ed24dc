"""Input pipeline on the device (semantics §2): normalisation and the three training augmentations.

Everything is vectorised over the batch and driven by JAX keys, so it fuses into the compiled
train step. Images are NHWC float32 after ``normalize``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)
PAD = 4
MAX_DEGREES = 15.0


def normalize(images: jax.Array) -> jax.Array:
    """uint8 NHWC images → float32, scaled to [0, 1] then per-channel standardised."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


def flip(images: jax.Array, do_flip: jax.Array) -> jax.Array:
    """Horizontal flip of the images whose ``do_flip`` entry is true."""
    return jnp.where(do_flip[:, None, None, None], images[:, :, ::-1, :], images)


def crop(images: jax.Array, offsets: jax.Array) -> jax.Array:
    """Reflect-pad by 4 pixels and take the 32×32 window at ``offsets`` [B, 2] (row, col)."""
    h, w = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)), mode="reflect")

    def one(img: jax.Array, off: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(one)(padded, offsets)


def rotate(images: jax.Array, degrees: jax.Array) -> jax.Array:
    """Rotate each image counter-clockwise by ``degrees`` [B] about its centre.

    Nearest-neighbour sampling, fill 0 outside the image, as torchvision's tensor ``rotate``
    (inverse map on pixel centres, then round half to even and a bounds check).
    """
    b, h, w, c = images.shape
    theta = jnp.deg2rad(degrees.astype(jnp.float32))
    cos, sin = jnp.cos(theta)[:, None, None], jnp.sin(theta)[:, None, None]
    ys = jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2.0
    xs = jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2.0
    yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
    x_in = cos * xx - sin * yy + (w - 1) / 2.0
    y_in = sin * xx + cos * yy + (h - 1) / 2.0
    xi = jnp.round(x_in).astype(jnp.int32)
    yi = jnp.round(y_in).astype(jnp.int32)
    valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    flat = images.reshape(b, h * w, c)
    idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
    out = jnp.take_along_axis(flat, idx.reshape(b, h * w, 1), axis=1).reshape(b, h, w, c)
    return jnp.where(valid[..., None], out, jnp.zeros((), images.dtype))


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
    """Flip (p = 0.5) → reflect-pad 4 and random 32×32 crop → rotate U[0°, 15°], in that order."""
    k_flip, k_crop, k_rot = jax.random.split(key, 3)
    b = images.shape[0]
    images = flip(images, jax.random.bernoulli(k_flip, 0.5, (b,)))
    images = crop(images, jax.random.randint(k_crop, (b, 2), 0, 2 * PAD + 1))
    return rotate(images, jax.random.uniform(k_rot, (b,), minval=0.0, maxval=MAX_DEGREES))
