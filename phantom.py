"""Phantom chests: anatomy, findings and rendering, the built-in stand-in for the paper's datasets (paper 2.4).

A phantom patient is a set of shapes (body wall, lungs, vessels, heart, aorta,
spine, ribs) and findings driven by its five labels (Atelectasis, Cardiomegaly,
Consolidation, Lung Opacity, Pleural Effusion, in that order). `render`
paints them on a grid and returns what a scanner would give, before any
preprocessing:
- 3D: a CT volume in Hounsfield units, (Z, Y, X) = superior -> inferior,
  anterior -> posterior, patient right -> left, isotropic voxels, long side `size`;
- 2D: a frontal radiograph, the line integral of attenuation through the same
  kind of body along Y (bright = dense), (H, W) with H = `size`.
data.py then preprocesses both exactly like real images (window, min-max).

Imports numpy and torch only: copy it alone.

    rng = phantom_rng("phantom3d", "train", 0, seed=0)
    patient = sample_patient(rng)                  # cheap: labels and shapes, no rendering
    hu = render(patient, rng, "3d", 112, external=False)
"""
import math
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

PHANTOMS = ("phantom2d", "phantom3d", "phantom2d-ext", "phantom3d-ext")

# Tissue classes painted into a label volume; CT shows HU, a radiograph the
# line integral of attenuation (water = 1; bone attenuates X-rays more than its HU says).
AIR, FAT, TISSUE, LUNG, VESSEL, HEART, BONE, FLUID, CONS, ATEL, HAZE = range(11)
HU_OF = np.array([-1000, -100, 20, -850, 40, 55, 450, 10, 30, 0, -550], np.float32)
MU_OF = np.maximum((HU_OF + 1000) / 1000, 0)
MU_OF[BONE] = 1.6
IN_LUNG = np.isin(np.arange(11), [LUNG, VESSEL, HAZE, CONS, ATEL])  # lookups: which classes a finding may cover
AERATED = np.arange(11) == LUNG
PREVALENCE = np.array([0.25, 0.20, 0.12, 0.35, 0.22])  # target prevalence of each label, in the order of the docstring
EXTERNAL_SHIFTS = ("resolution", "noise", "calibration")  # what makes an external acquisition (render)
PHANTOM_VERSION = 1  # bump when the generator changes: it is part of the phantom fingerprint


def sample_patient(rng: np.random.Generator) -> dict:
    """Anatomy and findings of one phantom patient (cheap: no rendering).

    Normalized coordinates: x in [-1, 1] across the in-plane field of view
    (patient right at -1), y anterior (-1) -> posterior (+1), z superior ->
    inferior in the same units. Labels co-occur through a shared severity.
    """
    severity = rng.standard_normal()  # shared by the five labels: findings co-occur
    thresholds = [NormalDist().inv_cdf(1 - p) for p in PREVALENCE]
    labels = 0.6 * severity + 0.8 * rng.standard_normal(5) > thresholds
    atel, cardio, cons, opac, effu = labels
    s = rng.uniform(0.9, 1.05)
    ox, oy = rng.uniform(-0.04, 0.04, 2)
    lungs = []
    for side in (-1, 1):  # right lung, then left (smaller: the heart)
        r = np.array([0.62, 0.42, 0.30 if side < 0 else 0.27]) * s * rng.uniform(0.95, 1.05, 3)
        c = np.array([-0.1 + rng.uniform(-0.03, 0.03), -0.02 + oy, side * 0.40 * s + ox])
        lungs.append([c, r])
    p = {"labels": labels.astype(np.float32), "scale": s, "offset": (ox, oy),
         "lungs": lungs, "heart_scale": rng.uniform(1.35, 1.6) if cardio else rng.uniform(0.9, 1.05),
         "rib_phase": rng.uniform(0, 1), "hu_offset": rng.uniform(-10, 10),
         "gamma": rng.uniform(0.85, 1.15), "noise": rng.uniform(0.6, 1.4)}
    p["vessels"] = [(lungs[k][0] + lungs[k][1] * _in_ball(rng, 0.8), rng.uniform(0.018, 0.035))
                    for k in rng.integers(0, 2, 24)]
    if atel:  # volume loss of one lung plus a plate of collapsed lung at its base
        k = rng.integers(0, 2)
        c, r = lungs[k]
        loss = rng.uniform(0.8, 0.9)
        c[0] -= r[0] * (1 - loss)  # raised hemidiaphragm
        r[0] *= loss
        r[1] *= rng.uniform(0.88, 0.95)
        normal = np.array([1.0, rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4)])
        p["atel"] = (k, c + r * np.array([rng.uniform(0.2, 0.5), 0, 0]), normal / np.linalg.norm(normal),
                     rng.uniform(0.025, 0.04))
    if cons:  # one or two dense blobs in a lobe
        p["cons"] = [(lungs[k][0] + lungs[k][1] * _in_ball(rng, 0.55), rng.uniform(0.10, 0.18, 3))
                     for k in rng.integers(0, 2, rng.integers(1, 3))]
    if opac:  # diffuse ground-glass haze over a large region
        k = rng.integers(0, 2)
        p["haze"] = (lungs[k][0] + lungs[k][1] * _in_ball(rng, 0.4), rng.uniform(0.35, 0.55))
    if effu:  # dependent fluid: inferior and posterior parts of one or both lungs
        sides = [[0], [1], [0, 1]][rng.choice(3, p=[0.4, 0.3, 0.3])]
        p["effusion"] = [(k, rng.uniform(0.3, 0.55)) for k in sides]
    return p


def _in_ball(rng, radius):
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v) * radius * rng.uniform(0, 1) ** (1 / 3)


def _paint(lab, axes, box, inside, value, over=None):
    """Set lab to `value` where inside(z, y, x) holds, within box ((lo), (hi)) only.

    axes: ascending coordinates of the (Z, Y, X) voxel centres; over: a boolean
    lookup of the classes that may be overwritten (None: any).
    """
    sl = tuple(slice(*np.searchsorted(a, [lo, hi])) for a, lo, hi in zip(axes, *box))
    if any(s.stop <= s.start for s in sl):
        return
    z, y, x = (a[s] for a, s in zip(axes, sl))
    m = np.broadcast_to(inside(z[:, None, None], y[None, :, None], x[None, None, :]),
                        (len(z), len(y), len(x)))
    view = lab[sl]
    if over is not None:
        m = m & over[view]
    view[m] = value


def _ellipsoid(c, r):
    return ((c - r, c + r),
            lambda z, y, x: ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1)


def _cylinder(cx, cy, rx, ry, z0=-9.0, z1=9.0):
    """Elliptic cylinder along z: (box, inside) for _paint."""
    return ((z0, cy - ry, cx - rx), (z1, cy + ry, cx + rx)), \
        lambda z, y, x: ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def render_labels(p: dict, axes) -> np.ndarray:
    """Paint the tissue classes of patient p on the grid axes (z, y, x) -> uint8 (Z, Y, X)."""
    lab = np.zeros(tuple(len(a) for a in axes), np.uint8)
    s, (ox, oy) = p["scale"], p["offset"]
    bx, by = 0.86 * s, 0.62 * s  # body half-width and half-depth
    _paint(lab, axes, *_cylinder(ox, oy, bx, by), FAT)
    _paint(lab, axes, *_cylinder(ox, oy, bx - 0.06, by - 0.06), TISSUE)
    for c, r in p["lungs"]:
        _paint(lab, axes, *_ellipsoid(c, r), LUNG)
    for c, r in p["vessels"]:
        _paint(lab, axes, *_ellipsoid(c, np.full(3, r)), VESSEL, IN_LUNG)
    hs = p["heart_scale"]  # cardiomegaly: a wider (and somewhat deeper) heart pushes the lungs aside
    heart_r = np.array([0.22, 0.32 * (1 + (hs - 1) / 2), 0.25 * hs]) * s
    _paint(lab, axes, *_ellipsoid(np.array([0.25, -0.06 + oy, 0.08 * s + ox]), heart_r), HEART)
    _paint(lab, axes, *_cylinder(0.12 * s + ox, 0.30 * s + oy, 0.055 * s, 0.055 * s, -0.55, 0.7), HEART)  # aorta
    box, body = _cylinder(ox, 0.50 * s + oy, 0.11 * s, 0.11 * s)
    pitch = 0.11 * s  # vertebrae separated by discs
    _paint(lab, axes, box, lambda z, y, x: body(z, y, x) & ((z / pitch + p["rib_phase"]) % 1 > 0.2), BONE)

    def ribs(z, y, x):  # a shell inside the body wall, cut into bands that slope down laterally
        shell = ((x - ox) / bx) ** 2 + ((y - oy) / by) ** 2
        bands = np.cos(2 * np.pi * (z / 0.22 - 0.5 * np.abs(x - ox) + p["rib_phase"])) > 0.6
        return (0.80 < shell) & (shell < 0.88) & (np.abs(x - ox) > 0.12) & bands

    _paint(lab, axes, ((-0.9, -1, -1), (0.65, 1, 1)), ribs, BONE)
    lungs = p["lungs"]
    if "haze" in p:
        c, r = p["haze"]
        _paint(lab, axes, *_ellipsoid(c, np.full(3, r)), HAZE, AERATED)
    for c, r in p.get("cons", []):
        _paint(lab, axes, *_ellipsoid(c, r), CONS, IN_LUNG)
    if "atel" in p:  # a plate of collapsed lung
        k, c, n, half = p["atel"]
        box = (lungs[k][0] - lungs[k][1], lungs[k][0] + lungs[k][1])
        plate = lambda z, y, x: np.abs((z - c[0]) * n[0] + (y - c[1]) * n[1] + (x - c[2]) * n[2]) < half
        _paint(lab, axes, box, plate, ATEL, IN_LUNG)
    for k, depth in p.get("effusion", []):  # fluid fills the lung from its dependent (inferior-posterior) end
        c, r = lungs[k]
        base = c[0] + 0.4 * c[1] + math.hypot(r[0], 0.4 * r[1])  # highest value of z + 0.4 y in the lung
        _paint(lab, axes, (c - r, c + r), lambda z, y, x: z + 0.4 * y > base - depth, FLUID, IN_LUNG)
    return lab


def _axis(n: int, lo: float, hi: float) -> np.ndarray:
    return (lo + (np.arange(n, dtype=np.float32) + 0.5) * (hi - lo) / n).astype(np.float32)


def _upsample(img: np.ndarray, shape) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    mode = "trilinear" if img.ndim == 3 else "bilinear"
    return F.interpolate(t, size=tuple(shape), mode=mode, align_corners=False)[0, 0].numpy()


def field_of_view(rng: np.random.Generator, modality: str) -> tuple:
    """render's first draws: the half extent of the scanned field along z (a CT's slab, a film's height, in the
    units where the field is 2 wide) and its centre. Acquisition, not anatomy: no label depends on them."""
    half_z = rng.uniform(0.75, 1.0) if modality == "3d" else rng.uniform(1.0, 1.2)
    return half_z, rng.uniform(-0.12, 0.0)


def render(p: dict, rng: np.random.Generator, modality: str, size: int, external) -> np.ndarray:
    """Render patient p, unprocessed: a CT volume in HU (Z, size, size), or a frontal radiograph
    (size, W), the line integral of attenuation through the same kind of volume along Y.

    external: True for a shifted acquisition (coarser resolution, more noise, other intensity
    calibration), the role CheXpert and RAD-ChestCT play for real data; or a subset of EXTERNAL_SHIFTS,
    only those (one factor at a time, controls.py --shifts). The random draws are the same whatever
    is shifted, so a patient differs between two settings only by the shifts.
    """
    shifts = set(EXTERNAL_SHIFTS) if external is True else set(external or ())
    if not shifts <= set(EXTERNAL_SHIFTS):
        raise ValueError(f"unknown acquisition shift(s) {sorted(shifts - set(EXTERNAL_SHIFTS))}; "
                         f"the shifts are {EXTERNAL_SHIFTS}")
    half_z, centre = field_of_view(rng, modality)
    if modality == "3d":  # square axial field of view, z extent varies: (Z, size, size)
        shape = (max(1, round(size * half_z)), size, size)
    else:  # frontal view: x spans the field of view, z (rows) the longer side
        shape = (size, max(1, round(size / half_z)))
    res = 0.6 if "resolution" in shifts else 1.0  # rendered coarser, then upsampled
    coarse = [max(2, round(n * res)) for n in shape]
    z = _axis(coarse[0], centre - half_z, centre + half_z)
    x = _axis(coarse[-1], -1, 1)
    noise = p["noise"] * (2.5 if "noise" in shifts else 1.0)
    if modality == "3d":
        lab = render_labels(p, (z, _axis(coarse[1], -1, 1), x))
        hu = HU_OF[lab] + p["hu_offset"]
        if "calibration" in shifts:
            hu = hu * 1.04 + 30
        if "resolution" in shifts:
            hu = _upsample(hu, shape)
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * (18 * noise)
        return hu
    lab = render_labels(p, (z, _axis(32, -1, 1), x))
    line = MU_OF[lab].mean(axis=1)  # (H, W) line integral of attenuation through the body
    if "resolution" in shifts:
        line = _upsample(line, shape)
    img = line ** (p["gamma"] * (0.7 if "calibration" in shifts else 1.0))
    img += rng.standard_normal(img.shape, dtype=np.float32) * (0.015 * noise)
    return img


def phantom_rng(name: str, split: str, index: int, seed: int) -> np.random.Generator:
    """Patients differ across the four phantom sources and across splits."""
    return np.random.default_rng([seed, PHANTOMS.index(name), ("train", "test").index(split), index])

