"""Synthetic face masks for masked-face augmentation (BigFace) and masked evaluation (MFR).

A mask is drawn in a *face frame* built from the five landmarks (default: the
ArcFace template scaled to the image, i.e. an aligned face): origin at the eye
centre, ``t`` running down to the mouth centre (t=1), ``h`` across in the same
unit (template: 1 unit = 40.7 px at 112x112). The outline is a smooth closed
spline from the nose bridge (t~0.27) over the cheeks to below the chin
(t~1.75); fill, pleats, seams, stripes... are functions of (h, t), so they bend
with the face. The mask is shaded by its curvature (sides turn away), lit by
the photo's own low-frequency light (a plane fitted to the covered pixels'
luminance), anti-aliased and feathered, and casts a faint shadow on the skin.

Per-sample reproducibility: every random choice comes from the ``rng`` passed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

import cv2
import numpy as np
from PIL import Image

MASK_STYLES = ("surgical", "n95", "cloth")
PATTERNS = ("solid", "stripes", "noise", "dots", "checks")
_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# RGB palettes in [0, 1].
_SURGICAL = [(0.55, 0.74, 0.86), (0.60, 0.80, 0.88), (0.93, 0.94, 0.95), (0.62, 0.82, 0.72), (0.94, 0.76, 0.82),
             (0.16, 0.16, 0.18)]
_N95 = [(0.94, 0.94, 0.92), (0.90, 0.91, 0.92), (0.80, 0.81, 0.82), (0.95, 0.93, 0.88)]
_CLOTH = [(0.08, 0.08, 0.09), (0.12, 0.16, 0.30), (0.45, 0.46, 0.48), (0.55, 0.10, 0.12), (0.20, 0.35, 0.25),
          (0.82, 0.80, 0.74), (0.30, 0.45, 0.65), (0.55, 0.40, 0.60)]

# Closed outline in face units (h, t), clockwise from the nose bridge, before jitter.
_OUTLINES = {
    "surgical": [(0, 0.25), (0.32, 0.29), (0.68, 0.37), (1.00, 0.47), (1.04, 0.82), (0.88, 1.22), (0.50, 1.57),
                 (0, 1.72), (-0.50, 1.57), (-0.88, 1.22), (-1.04, 0.82), (-1.00, 0.47), (-0.68, 0.37), (-0.32, 0.29)],
    "n95": [(0, 0.22), (0.30, 0.28), (0.66, 0.39), (0.92, 0.53), (1.00, 0.85), (0.84, 1.30), (0.45, 1.62),
            (0, 1.71), (-0.45, 1.62), (-0.84, 1.30), (-1.00, 0.85), (-0.92, 0.52), (-0.66, 0.37), (-0.30, 0.25)],
    "cloth": [(0, 0.22), (0.30, 0.27), (0.66, 0.36), (0.98, 0.49), (1.05, 0.86), (0.90, 1.27), (0.52, 1.62),
              (0, 1.77), (-0.52, 1.62), (-0.90, 1.27), (-1.05, 0.86), (-0.98, 0.49), (-0.66, 0.36), (-0.30, 0.27)],
}
# Ellipsoid the mask surface is shaded as (centre t, horizontal and vertical radii): a cup bulges most.
_BULGE = {"surgical": (0.9, 1.25, 1.3), "n95": (0.9, 1.15, 1.0), "cloth": (0.95, 1.2, 1.2)}

ImageT = TypeVar("ImageT", np.ndarray, Image.Image)


def default_landmarks(height: int, width: int) -> np.ndarray:
    """The ArcFace template scaled to an aligned ``height`` x ``width`` face (5x2, x/y)."""
    return _TEMPLATE_112 * np.array([width / 112.0, height / 112.0], dtype=np.float32)


def face_frame(landmarks: np.ndarray | Sequence) -> np.ndarray:
    """2x3 affine mapping face units (h, t, 1) to pixels: t down eyes->mouth, h across (scaled by eye gap)."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if lm.shape != (5, 2) or not np.isfinite(lm).all():
        raise ValueError(f"landmarks must be 5 finite (x, y) points, got shape {np.shape(landmarks)}")
    eye, mouth = lm[:2].mean(0), lm[3:].mean(0)
    down = mouth - eye
    unit = float(np.hypot(*down))
    if unit < 1e-3:
        raise ValueError("landmarks are degenerate: eyes and mouth coincide")
    ev = down / unit
    eh = np.array([ev[1], -ev[0]])  # perpendicular, pointing from the left eye to the right eye
    # Horizontal unit follows the eye gap (narrower when the head turns); template ratio 40.66 / 35.24.
    h_unit = float(np.hypot(*(lm[1] - lm[0]))) * (40.66 / 35.24)
    return np.column_stack([eh * h_unit, ev * unit, eye])


def _catmull_rom(points: np.ndarray, samples: int = 12) -> np.ndarray:
    """Closed Catmull-Rom spline through ``points`` (N x 2) -> smooth polygon."""
    p = np.asarray(points, dtype=np.float64)
    s = np.linspace(0, 1, samples, endpoint=False)[:, None]
    out = []
    for i in range(len(p)):
        p0, p1, p2, p3 = p[i - 1], p[i], p[(i + 1) % len(p)], p[(i + 2) % len(p)]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s**2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * s**3))
    return np.concatenate(out)


@dataclass(frozen=True)
class MaskSpec:
    """All random choices for one mask (drawn by :func:`sample_spec`)."""

    style: str
    pattern: str
    color: tuple[float, float, float]
    color2: tuple[float, float, float]
    outline: np.ndarray  # control points in face units
    pattern_scale: float
    pattern_angle: float
    valve: bool
    seam: bool


def _jitter_color(rng: np.random.Generator, rgb: Sequence[float], amount: float = 0.06) -> tuple[float, float, float]:
    c = np.asarray(rgb) * rng.uniform(1 - amount, 1 + amount) + rng.normal(0, amount / 3, 3)
    return tuple(float(v) for v in np.clip(c, 0.02, 0.98))


def sample_spec(rng: np.random.Generator, style: str | None = None) -> MaskSpec:
    """Draw a mask: style, outline (scaled / shifted / tilted / wobbled), colours and texture."""
    if style is None:
        style = str(rng.choice(MASK_STYLES, p=[0.45, 0.25, 0.30]))
    if style not in _OUTLINES:
        raise ValueError(f"mask style must be one of {MASK_STYLES}, got {style!r}")
    pts = np.array(_OUTLINES[style], dtype=np.float64)
    top = pts[:, 1] < 0.5
    pts[:, 0] *= rng.uniform(0.94, 1.06)                           # width
    pts[top, 1] += rng.uniform(-0.03, 0.06)                        # how high up the nose
    pts[~top, 1] = 0.8 + (pts[~top, 1] - 0.8) * rng.uniform(0.95, 1.06)  # chin depth
    angle = np.deg2rad(rng.uniform(-3, 3))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (pts - (0, 0.8)) @ rot.T + (0, 0.8) + (rng.uniform(-0.03, 0.03), rng.uniform(-0.02, 0.03))
    pts += rng.normal(0, 0.012, pts.shape)
    if style == "surgical":
        color, pattern = _SURGICAL[rng.integers(len(_SURGICAL))], "solid"
    elif style == "n95":
        color, pattern = _N95[rng.integers(len(_N95))], "noise"
    else:
        color = _CLOTH[rng.integers(len(_CLOTH))]
        pattern = str(rng.choice(PATTERNS, p=[0.35, 0.2, 0.2, 0.1, 0.15]))
    color2 = _CLOTH[rng.integers(len(_CLOTH))] if rng.random() < 0.5 else (0.92, 0.92, 0.90)
    return MaskSpec(style, pattern, _jitter_color(rng, color), _jitter_color(rng, color2), pts,
                    float(rng.uniform(0.08, 0.16)), float(rng.uniform(-0.6, 0.6)),
                    valve=style == "n95" and rng.random() < 0.3, seam=style != "surgical" and rng.random() < 0.6)


def _pattern(spec: MaskSpec, h: np.ndarray, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend weight (H x W, 0 = colour, 1 = colour2) of the fabric print in face coordinates."""
    u = h * np.cos(spec.pattern_angle) + t * np.sin(spec.pattern_angle)
    v = -h * np.sin(spec.pattern_angle) + t * np.cos(spec.pattern_angle)
    s = spec.pattern_scale
    if spec.pattern == "stripes":
        return (np.sin(2 * np.pi * u / s) > 0.2).astype(np.float32)
    if spec.pattern == "checks":
        return 0.5 * ((np.sin(2 * np.pi * u / s) > 0).astype(np.float32) + (np.sin(2 * np.pi * v / s) > 0))
    if spec.pattern == "dots":
        du, dv = (u / s) % 1 - 0.5, (v / s) % 1 - 0.5
        return (du**2 + dv**2 < 0.07).astype(np.float32)
    if spec.pattern == "noise":  # heathered yarn: fibres of the second colour scattered in
        fibres = cv2.GaussianBlur(rng.normal(0, 1, h.shape).astype(np.float32), (0, 0), 0.7)
        return np.clip(0.15 + 0.25 * fibres, 0, 1)
    return np.zeros_like(h, dtype=np.float32)


def _fabric_noise(shape: tuple[int, int], rng: np.random.Generator, coarse: float, fine: float) -> np.ndarray:
    """Multiplicative fabric grain: low-frequency mottling plus per-pixel fibre noise."""
    h, w = shape
    low = rng.normal(0, 1, (max(2, h // 10), max(2, w // 10))).astype(np.float32)
    low = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    return 1 + coarse * low + fine * rng.normal(0, 1, shape).astype(np.float32)


def render_mask(shape: tuple[int, int], rng: np.random.Generator, landmarks: np.ndarray | None = None,
                style: str | MaskSpec | None = None, image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render a mask for an ``shape`` = (H, W) face: (RGB float32 H x W x 3 in [0, 1], alpha H x W in [0, 1]).

    ``style``: a style name, a drawn :class:`MaskSpec`, or None (random). ``image`` (uint8 RGB),
    when given, lends its lighting to the mask.
    """
    hgt, wid = int(shape[0]), int(shape[1])
    lm = default_landmarks(hgt, wid) if landmarks is None else np.asarray(landmarks, np.float32)
    frame = face_frame(lm)
    spec = style if isinstance(style, MaskSpec) else sample_spec(rng, style)
    unit = float(np.hypot(*frame[:, 1]))                      # pixels per face unit (vertical)

    rgb_out, alpha_out = np.zeros((hgt, wid, 3), np.float32), np.zeros((hgt, wid), np.float32)

    # Work only inside the mask's bounding box (plus the feather), clipped to the image.
    poly = _catmull_rom(spec.outline) @ frame[:, :2].T + frame[:, 2]
    pad = int(np.ceil(0.05 * unit)) + 3
    x0, y0 = (int(v) for v in np.maximum(np.floor(poly.min(0)) - pad, 0))
    x1, y1 = (int(v) for v in np.minimum(np.ceil(poly.max(0)) + pad + 1, (wid, hgt)))
    if x1 <= x0 or y1 <= y0:
        return rgb_out, alpha_out
    roi_h, roi_w = y1 - y0, x1 - x0

    # Alpha: 4x supersampled polygon -> area downsample (anti-aliased edge) -> slight feather.
    ss = 4
    big = np.zeros((roi_h * ss, roi_w * ss), np.uint8)
    cv2.fillPoly(big, [np.round((poly - (x0, y0)) * ss).astype(np.int32)], 255, lineType=cv2.LINE_8)
    alpha = cv2.resize(big, (roi_w, roi_h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(0.35, 0.012 * unit))

    # Face coordinates of every pixel.
    inv = cv2.invertAffineTransform(frame)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    h = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    t = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]

    base = np.asarray(spec.color, np.float32)
    weight = _pattern(spec, h, t, rng)[..., None]
    rgb = base * (1 - weight) + np.asarray(spec.color2, np.float32) * weight

    shade, rgb = _shading(spec, h, t, alpha, unit, rgb, rng)
    light = _scene_light(image, alpha, h, t, (y0, y1, x0, x1))
    rgb = np.clip(rgb * (shade * light)[..., None], 0, 1)
    rgb = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), max(0.3, 0.012 * unit))  # the photo's softness
    rgb_out[y0:y1, x0:x1], alpha_out[y0:y1, x0:x1] = rgb, alpha
    return rgb_out, alpha_out


def _shading(spec: MaskSpec, h: np.ndarray, t: np.ndarray, alpha: np.ndarray, unit: float, rgb: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel shading of the mask (and its colour, which a valve changes), in face coordinates ``h``, ``t``."""
    # Shape shading: Lambert on an ellipsoid over the face, lit from the front and slightly above.
    tc, rh, rt = _BULGE[spec.style]
    nx, ny = np.clip(h / rh, -0.97, 0.97), np.clip((t - tc) / rt, -0.97, 0.97)
    nz = np.sqrt(np.clip(1 - nx**2 - ny**2, 0.02, 1))
    lx = rng.uniform(-0.35, 0.35)
    light_dir = np.array([lx, -0.35, 0.9]) / np.linalg.norm([lx, -0.35, 0.9])
    shade = 0.42 + 0.62 * np.clip(nx * light_dir[0] + ny * light_dir[1] + nz * light_dir[2], 0, 1)
    shade += 0.05 * np.exp(-(h / 0.15) ** 2) * np.exp(-((t - 0.5) / 0.25) ** 2)  # nose ridge highlight
    if spec.style == "surgical":  # three horizontal pleats bowing with the cheeks: fold shadow + highlight
        tb = t - 0.1 * h**2
        phase = ((tb - 0.62) / 0.22) % 1.0
        inside = (tb > 0.62) & (tb < 1.28) & (np.abs(h) < 0.95)
        shade -= inside * (0.16 * np.exp(-phase / 0.07) - 0.05 * np.exp(-((phase - 0.6) / 0.2) ** 2))
    if spec.seam:  # centre seam (cloth) or fold (KN95): thin dark line, halves lit differently
        shade -= 0.18 * np.exp(-(h / 0.02) ** 2) * (t > 0.25)
        shade *= np.where(h < 0, 1.03, 0.95)
    if spec.valve:  # exhalation valve on one cheek
        side = 1 if rng.random() < 0.5 else -1
        r = np.hypot(h - side * 0.48, t - 1.0)
        disc = r < 0.17
        rgb = np.where(disc[..., None], np.asarray(_jitter_color(rng, (0.75, 0.76, 0.78))), rgb)
        shade -= 0.25 * np.exp(-((r - 0.17) / 0.02) ** 2) - 0.08 * disc * (t < 1.0)
    # Hem: a slightly darker band along the edge (binding / stitching), and edge ambient occlusion.
    dist = cv2.distanceTransform((alpha > 0.5).astype(np.uint8), cv2.DIST_L2, 3) / unit
    shade -= 0.05 * (dist < 0.06) * (spec.style != "cloth") + 0.06 * np.exp(-dist / 0.05)
    coarse, fine = {"surgical": (0.015, 0.012), "n95": (0.03, 0.02), "cloth": (0.04, 0.025)}[spec.style]
    return shade * _fabric_noise(alpha.shape, rng, coarse, fine), rgb


def _scene_light(image: np.ndarray | None, alpha: np.ndarray, h: np.ndarray, t: np.ndarray,
                 box: tuple[int, int, int, int]) -> np.ndarray:
    """Brightness of the scene over the mask's box: a plane fitted to the luminance of the covered skin."""
    y0, y1, x0, x1 = box  # no facial detail leaks through: only a plane over the covered pixels
    light = np.ones(alpha.shape, np.float32)
    if image is not None:
        lum = image[y0:y1, x0:x1].astype(np.float32).mean(2) / 255
        sel = alpha > 0.5
        if sel.sum() > 10:
            a = np.column_stack([h[sel], t[sel], np.ones(sel.sum())])
            coef, *_ = np.linalg.lstsq(a, lum[sel], rcond=None)
            mean = max(float(lum[sel].mean()), 1e-3)
            plane = (coef[0] * h + coef[1] * t + coef[2]) / mean
            level = float(np.clip((mean / 0.5) ** 0.7, 0.45, 1.1))
            light = level * np.clip(1 + 0.6 * (plane - 1), 0.7, 1.3)
    return light


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 16) -> np.ndarray:
    s = np.linspace(0, 1, n)[:, None]
    return (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s**2 * p2


def _straps(out: np.ndarray, spec_style: str, lm: np.ndarray, rng: np.random.Generator, color: np.ndarray) -> None:
    """Ear loops (or N95 head straps) from the mask's side corners, drawn in place, anti-aliased."""
    frame = face_frame(lm)
    unit = float(np.hypot(*frame[:, 1]))
    thick = max(1, int(round(0.03 * unit)))
    c = tuple(float(v) for v in np.clip(color * rng.uniform(0.8, 0.95), 0, 1))
    ear = np.array([1.36, rng.uniform(0.30, 0.42)])
    for side in (-1, 1):
        flip = np.array([side, 1.0])
        if spec_style == "n95":   # two elastic bands running back round the head
            curves = [_bezier(np.array([0.93, 0.55]), np.array([1.2, 0.42]), np.array([1.6, 0.30])),
                      _bezier(np.array([0.86, 1.25]), np.array([1.2, 1.1]), np.array([1.6, 1.0]))]
        else:                      # loops meeting behind the ear
            curves = [_bezier(np.array([0.99, 0.52]), np.array([1.18, 0.45]), ear),
                      _bezier(np.array([0.90, 1.18]), np.array([1.25, 0.95]), ear)]
        for curve in curves:
            px = (curve * flip) @ frame[:, :2].T + frame[:, 2]
            cv2.polylines(out, [np.round(px * 16).astype(np.int32)], False, c, thick, cv2.LINE_AA, shift=4)


def apply_mask(image: ImageT, rng: np.random.Generator, landmarks: np.ndarray | None = None,
               style: str | None = None) -> ImageT:
    """Return ``image`` (PIL or H x W x 3 uint8 RGB) wearing a synthetic mask; the input is not modified.

    ``landmarks`` (5x2 pixels) default to the ArcFace template scaled to the image (an aligned face).
    """
    is_pil = isinstance(image, Image.Image)
    arr = np.asarray(image.convert("RGB") if is_pil else image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"apply_mask expects an H x W x 3 uint8 RGB image, got {arr.dtype} {arr.shape}")
    hgt, wid = arr.shape[:2]
    lm = default_landmarks(hgt, wid) if landmarks is None else np.asarray(landmarks, np.float32)
    spec = sample_spec(rng, style)
    rgb, alpha = render_mask((hgt, wid), rng, lm, spec, image=arr)
    face = arr.astype(np.float32) / 255
    # Faint contact shadow on the skin just outside the mask.
    shadow = cv2.GaussianBlur(alpha, (0, 0), max(0.8, 0.03 * np.hypot(*face_frame(lm)[:, 1])))
    face *= (1 - 0.25 * shadow * (1 - alpha))[..., None]
    if rng.random() < 0.8:
        loops = face.copy()
        _straps(loops, spec.style, lm, rng, rgb[alpha > 0.9].mean(0) if (alpha > 0.9).any() else np.ones(3))
        face = np.where((alpha < 0.5)[..., None], loops, face)
    out = face * (1 - alpha[..., None]) + rgb * alpha[..., None]
    out = np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out) if is_pil else out


def mask_applies(prob: float, rng: np.random.Generator) -> bool:
    """:class:`MaskAugment`'s first draw: whether a call with ``rng`` masks the face (one value drawn unless
    ``prob`` is 0), so a caller can tell an unmasked sample ahead of the call."""
    return prob != 0.0 and rng.random() < prob


class MaskAugment:
    """Dataset transform: with probability ``prob`` put a random synthetic mask on an aligned face.

    Accepts and returns a PIL image or an H x W x 3 uint8 array. Without ``rng`` it draws from its
    own generator seeded by ``seed`` (deterministic in a single process; DataLoader workers would
    share the state, so pass ``rng=augment.rng_for(index, epoch)`` for per-sample reproducibility).
    """

    def __init__(self, prob: float = 0.35, seed: int = 0, styles: Sequence[str] = MASK_STYLES):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"MaskAugment prob must be in [0, 1], got {prob}")
        bad = [s for s in styles if s not in MASK_STYLES]
        if bad or not styles:
            raise ValueError(f"MaskAugment styles must be a non-empty subset of {MASK_STYLES}, got {list(styles)}")
        self.prob, self.seed, self.styles = float(prob), int(seed), tuple(styles)
        self._rng = np.random.default_rng(seed)

    def rng_for(self, index: int, epoch: int = 0) -> np.random.Generator:
        """An independent generator for one sample, reproducible from (seed, epoch, index)."""
        return np.random.default_rng([self.seed, int(epoch), int(index)])

    def __call__(self, img: ImageT, rng: np.random.Generator | None = None) -> ImageT:
        rng = self._rng if rng is None else rng
        if not mask_applies(self.prob, rng):
            return img
        style = self.styles[rng.integers(len(self.styles))] if len(self.styles) < len(MASK_STYLES) else None
        return apply_mask(img, rng, style=style)

    def __repr__(self) -> str:
        return f"MaskAugment(prob={self.prob}, seed={self.seed}, styles={self.styles})"
