"""CIFAR-10-C's 15 corruptions at 5 severities, for images in [0, 1], deterministic by seed.

After Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations" (ICLR 2019): the severity parameters are those
of their CIFAR-10-C generator (``make_cifar_c.py``, 32 px images), with three
changes that keep this module to numpy, scipy and Pillow and free of downloads:

* ``motion_blur`` uses a one-sided Gaussian line kernel at a random angle
  (what ImageMagick's ``motion_blur``, which they call through Wand, computes);
* ``frost`` blends a synthesised ice texture (seeded crystal streaks on
  multi-scale noise) instead of their six photographs of frost;
* ``glass_blur`` and ``elastic_transform`` scale their pixel distances with the
  image size (CIFAR's constants are for 32 px).

:func:`corrupt` takes ``(N, H, W)`` or ``(N, C, H, W)`` float arrays in [0, 1]
(any C; colour-aware corruptions treat C = 3 as RGB) and returns float32 of the
same shape, clipped to [0, 1]. The same ``(images, name, severity, seed)``
always gives the same output.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from scipy import ndimage

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
# The four groups of CIFAR-10-C.
GROUPS: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}


class CorruptionError(ValueError):
    """An unknown corruption, a severity out of range, or images of the wrong shape."""


Batch = np.ndarray  # (N, C, H, W) float64 in [0, 1]
_Fn = Callable[[Batch, int, np.random.Generator], Batch]


# -- noise ---------------------------------------------------------------------------


def _gaussian_noise(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    c = (0.04, 0.06, 0.08, 0.09, 0.10)[s - 1]
    return x + rng.normal(size=x.shape, scale=c)


def _shot_noise(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    c = (500, 250, 100, 75, 50)[s - 1]
    return rng.poisson(np.clip(x, 0, 1) * c) / c


def _impulse_noise(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    # scikit-image's random_noise(mode="s&p", amount=c): a fraction c of values, half salt.
    c = (0.01, 0.02, 0.03, 0.05, 0.07)[s - 1]
    out = x.copy()
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


# -- blurs -------------------------------------------------------------------------


def _filter_each(x: Batch, kernel: np.ndarray) -> Batch:
    """Convolve every (image, channel) plane with a 2-D kernel (reflect padding)."""
    return ndimage.convolve(x, kernel[None, None], mode="reflect")


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    size = max(int(np.ceil(radius)), 1)
    ax = np.arange(-size, size + 1)
    xx, yy = np.meshgrid(ax, ax)
    k = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    k /= k.sum()
    return ndimage.gaussian_filter(k, sigma=alias_blur)


def _defocus_blur(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[s - 1]
    scale = x.shape[-1] / 32
    return _filter_each(x, _disk(radius * scale, alias * scale))


def _glass_blur(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    sigma, delta, iters = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))[
        s - 1
    ]
    scale = x.shape[-1] / 32
    delta = max(1, round(delta * scale))
    out = ndimage.gaussian_filter(x, sigma=(0, 0, sigma * scale, sigma * scale))
    n, _, h, w = out.shape
    # Locally shuffle pixels: each pixel swaps with a random neighbour within delta.
    for _ in range(iters):
        for i in range(h - delta, delta - 1, -1):
            for j in range(w - delta, delta - 1, -1):
                dy, dx = rng.integers(-delta, delta, size=(2, n))
                idx = np.arange(n)
                a = out[idx, :, i, j].copy()
                out[idx, :, i, j] = out[idx, :, i + dy, j + dx]
                out[idx, :, i + dy, j + dx] = a
    return ndimage.gaussian_filter(out, sigma=(0, 0, sigma * scale, sigma * scale))


def _motion_kernel(radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    size = int(np.ceil(radius)) * 2 + 1
    k = np.zeros((size, size))
    c = size // 2
    t = np.deg2rad(angle_deg)
    for d in np.linspace(0, radius, int(radius * 4) + 1):  # one-sided, like ImageMagick
        yy, xx = c + d * np.sin(t), c + d * np.cos(t)
        iy, ix = round(float(yy)), round(float(xx))
        if 0 <= iy < size and 0 <= ix < size:
            k[iy, ix] += np.exp(-(d**2) / (2 * sigma**2))
    return k / k.sum()


def _motion_blur(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    radius, sigma = ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3))[s - 1]
    scale = x.shape[-1] / 32
    out = np.empty_like(x)
    for i in range(len(x)):
        k = _motion_kernel(radius * scale / 3, sigma * scale, rng.uniform(-45, 45))
        out[i] = ndimage.convolve(x[i], k[None], mode="nearest")
    return out


def _zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """Zoom every plane of ``img`` (C, H, W) about its centre, keeping H × W."""
    _, h, w = img.shape
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = img[:, top : top + ch, left : left + cw]
    z = ndimage.zoom(crop, (1, factor, factor), order=1)
    t, lft = (z.shape[1] - h) // 2, (z.shape[2] - w) // 2
    return z[:, t : t + h, lft : lft + w]


def _zoom_blur(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    top = (1.06, 1.11, 1.16, 1.21, 1.26)[s - 1]
    factors = np.arange(1, top, 0.01)
    n, ch, h, w = x.shape
    planes = x.reshape(n * ch, h, w)  # zoom all planes at once
    out = planes.copy()
    for f in factors[1:]:
        out += _zoom(planes, f)
    return (out / len(factors)).reshape(x.shape)


# -- weather -------------------------------------------------------------------------


def plasma_fractal(size: int, wibble_decay: float, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` × ``size`` (power of two) diamond-square fractal in [0, 1] (CIFAR-10-C's fog)."""
    maparray = np.zeros((size, size))
    step = size
    wibble = 100.0
    while step >= 2:
        half = step // 2
        wibble /= wibble_decay
        # squares
        corners = maparray[0:size:step, 0:size:step]
        sq = corners + np.roll(corners, -1, 0)
        sq = sq + np.roll(sq, -1, 1)
        maparray[half:size:step, half:size:step] = sq / 4 + rng.uniform(-wibble, wibble, sq.shape)
        # diamonds
        m = maparray.shape[0]
        dr = maparray[half:m:step, half:m:step]
        ul = maparray[0:m:step, 0:m:step]
        ldr = dr + np.roll(dr, 1, 1)
        lul = ul + np.roll(ul, -1, 0)
        ltsum = ldr + lul
        maparray[0:m:step, half:m:step] = ltsum / 4 + rng.uniform(-wibble, wibble, ltsum.shape)
        tdr = dr + np.roll(dr, 1, 0)
        tul = ul + np.roll(ul, -1, 1)
        ttsum = tdr + tul
        maparray[half:m:step, 0:m:step] = ttsum / 4 + rng.uniform(-wibble, wibble, ttsum.shape)
        step //= 2
    maparray -= maparray.min()
    return maparray / max(maparray.max(), 1e-12)


def _pow2(n: int) -> int:
    return 1 << max(int(np.ceil(np.log2(max(n, 2)))), 1)


def _fog(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    c0, c1 = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[s - 1]
    n, _, h, w = x.shape
    size = _pow2(max(h, w))
    out = np.empty_like(x)
    for i in range(n):
        fog = plasma_fractal(size, c1, rng)[:h, :w] * c0
        mx = x[i].max()
        out[i] = (x[i] + fog[None]) * mx / (mx + c0) if mx > 0 else x[i] + fog[None]
    return out


def _gray(x: Batch) -> np.ndarray:
    """(N, H, W) luminance (the mean for non-RGB channel counts)."""
    if x.shape[1] == 3:
        return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return x.mean(axis=1)


def _snow(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    loc, scale, zoom, thresh, radius, sigma, blend = (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    )[s - 1]
    n, _, h, w = x.shape
    px = h / 32
    out = np.empty_like(x)
    for i in range(n):
        layer = rng.normal(loc, scale, size=(1, h, w))
        layer = np.clip(_zoom(layer, zoom), 0, 1)
        layer[layer < thresh] = 0
        k = _motion_kernel(radius * px / 3, sigma * px / 3, rng.uniform(-135, -45))
        layer = ndimage.convolve(layer, k[None], mode="constant")
        gray = _gray(x[i : i + 1])[0]
        base = blend * x[i] + (1 - blend) * np.maximum(x[i], gray[None] * 1.5 + 0.5)
        out[i] = base + layer + np.rot90(layer, 2, axes=(1, 2))
    return out


def frost_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic frost layer in [0, 1]: multi-scale noise with thin bright crystal streaks.

    Stands in for CIFAR-10-C's frost photographs (not shipped with any package).
    """
    base = np.zeros((h, w))
    for octave, amp in ((4, 0.5), (2, 0.3), (1, 0.2)):
        noise = rng.random((max(h // octave, 1), max(w // octave, 1)))
        base += amp * ndimage.zoom(noise, (h / noise.shape[0], w / noise.shape[1]), order=1)[:h, :w]
    crystals = np.zeros((h, w))
    for _ in range(max(4, (h * w) // 64)):
        y, x0 = rng.integers(0, h), rng.integers(0, w)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.1, 0.4) * max(h, w)
        for d in np.linspace(0, length, int(length) + 1):
            yy, xx = int(y + d * np.sin(angle)) % h, int(x0 + d * np.cos(angle)) % w
            crystals[yy, xx] = 1.0
    crystals = ndimage.gaussian_filter(crystals, 0.5)
    tex = 0.6 * base + 0.8 * crystals
    tex -= tex.min()
    return tex / max(tex.max(), 1e-12)


def _frost(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    a, b = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))[s - 1]
    n, _, h, w = x.shape
    out = np.empty_like(x)
    for i in range(n):
        out[i] = a * x[i] + b * frost_texture(h, w, rng)[None]
    return out


def _brightness(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    # HSV value + c keeps hue and saturation: scale every channel by V' / V.
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[s - 1]
    v = x.max(axis=1, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    ratio = np.where(v > 1e-8, v_new / np.maximum(v, 1e-8), 0.0)
    out = x * ratio
    return np.where(v > 1e-8, out, v_new)  # black pixels become grey of value c


# -- digital -------------------------------------------------------------------------


def _contrast(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[s - 1]
    means = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - means) * c + means


def _elastic(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    # (alpha, sigma, affine) as fractions of the image size (CIFAR-10-C's constants / 32).
    alpha, sigma, affine = (
        (0.0, 0.0, 0.08),
        (0.05, 0.2, 0.07),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.05),
        (0.1, 0.03, 0.03),
    )[s - 1]
    n, ch, h, w = x.shape
    size = float(h)
    alpha, sigma, affine = alpha * size, sigma * size, affine * size
    out = np.empty_like(x)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for i in range(n):
        # random affine: move three points by up to ``affine`` pixels
        centre = np.array([h / 2, w / 2])
        sq = min(h, w) / 3
        src = np.array([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
        dst = src + rng.uniform(-affine, affine, size=src.shape)
        a_mat = np.hstack([dst, np.ones((3, 1))])
        coef = np.linalg.solve(a_mat, src)  # maps output coords to input coords
        in_y = coef[0, 0] * yy + coef[1, 0] * xx + coef[2, 0]
        in_x = coef[0, 1] * yy + coef[1, 1] * xx + coef[2, 1]
        if alpha > 0 and sigma > 0:
            dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect") * alpha
            dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect") * alpha
            in_y, in_x = in_y + dy, in_x + dx
        for c in range(ch):
            out[i, c] = ndimage.map_coordinates(x[i, c], [in_y, in_x], order=1, mode="reflect")
    return out


def _to_pil(plane: np.ndarray) -> object:
    from PIL import Image

    if plane.shape[0] == 3:
        return Image.fromarray(
            (np.clip(plane, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        )
    return Image.fromarray((np.clip(plane[0], 0, 1) * 255).round().astype(np.uint8), mode="L")


def _from_pil(img: object, channels: int) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float64) / 255.0
    return arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None].repeat(channels, axis=0)


def _per_pil_image(x: Batch, op: Callable[[object], object]) -> Batch:
    n, ch, _, _ = x.shape
    out = np.empty_like(x)
    for i in range(n):
        if ch in (1, 3):
            out[i] = _from_pil(op(_to_pil(x[i])), ch)
        else:  # any other channel count: one grey image per channel
            for c in range(ch):
                out[i, c] = _from_pil(op(_to_pil(x[i, c : c + 1])), 1)[0]
    return out


def _pixelate(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    from PIL import Image

    c = (0.95, 0.9, 0.85, 0.75, 0.65)[s - 1]
    h, w = x.shape[-2:]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    return _per_pil_image(
        x,
        lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX),  # type: ignore[attr-defined]
    )


def _jpeg(x: Batch, s: int, rng: np.random.Generator) -> Batch:
    from PIL import Image

    quality = (80, 65, 58, 50, 40)[s - 1]

    def compress(im: object) -> object:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)  # type: ignore[attr-defined]
        buf.seek(0)
        return Image.open(buf).convert(im.mode)  # type: ignore[attr-defined]

    return _per_pil_image(x, compress)


_FUNCS: dict[str, _Fn] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg,
}
assert tuple(_FUNCS) == CORRUPTIONS


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1–5) to images in [0, 1].

    ``images``: ``(N, H, W)`` or ``(N, C, H, W)``. Returns float32 of the same
    shape in [0, 1]; deterministic in ``seed``.
    """
    if name not in _FUNCS:
        raise CorruptionError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise CorruptionError(f"severity must be an integer 1-5, got {severity!r}")
    if severity not in SEVERITIES:
        raise CorruptionError(f"severity must be 1-5, got {severity}")
    x = np.asarray(images)
    if x.ndim not in (3, 4) or 0 in x.shape:
        raise CorruptionError(f"images must be (N, H, W) or (N, C, H, W), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise CorruptionError(f"images must be floats in [0, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise CorruptionError("images contain NaN or infinite values")
    squeeze = x.ndim == 3
    batch = np.clip(x[:, None] if squeeze else x, 0.0, 1.0).astype(np.float64)
    rng = np.random.default_rng([seed, CORRUPTIONS.index(name), severity])
    out = np.clip(_FUNCS[name](batch, int(severity), rng), 0.0, 1.0).astype(np.float32)
    return out[:, 0] if squeeze else out
