"""Digitally reconstructed radiographs (DRR): a frontal chest film computed from a CT volume.

Beyond the paper (DESIGN.md, "Beyond the paper"): a radiograph of the same patient for any CT, real or
phantom, so that how close a patient's X-ray and CT land in the shared space (paper section 1) can be measured.

Physics. At each detector pixel a radiograph records exp(-integral of mu along the ray), mu the linear
attenuation. CT gives attenuation relative to water, HU = 1000 (mu - mu_water) / mu_water, so
mu / mu_water = 1 + HU / 1000 (air 0, water 1, bone about 1.5-2). The log of a radiograph is therefore, up to
a constant, the line integral of (1 + HU / 1000): a DRR is that integral along the anterior-posterior axis, in
millimetres of water, shown with dense tissue bright as a film is read. phantom.py makes its radiographs the
same way from its label volumes.

What a DRR is not: no scatter, no beam hardening (one effective energy: bone is only as dense as its HU says),
no detector blur, response or noise, and a parallel beam, not a point source's cone. A stand-in for a
radiograph, not one.

Orientation. Volumes are (Z, Y, X) = superior -> inferior, anterior -> posterior, patient right -> left
(readers.py). Summing over Y gives (Z, X): superior at the top, the patient's right on the image's left, as
radiologists hang a frontal chest film.

Imports numpy and torch only: copy it alone.

    hu, spacing = ...                     # (Z, Y, X) HU and (z, y, x) mm
    image = drr(hu, spacing, size=224)    # (H, W) float32, mm of water, isotropic pixels, long side 224
"""
import numpy as np
import torch
import torch.nn.functional as F


def attenuation(hu: np.ndarray) -> np.ndarray:
    """mu / mu_water = 1 + HU / 1000, never negative (noise below -1000 HU is air)."""
    return np.maximum(1.0 + np.asarray(hu, dtype=np.float32) / 1000.0, 0.0)


def line_integral(hu: np.ndarray, spacing) -> np.ndarray:
    """(Z, Y, X) HU, spacing (z, y, x) mm -> (Z, X) float32: the path through the volume along Y (anterior ->
    posterior), in mm of water-equivalent tissue."""
    if hu.ndim != 3:
        raise ValueError(f"drr: expected a (Z, Y, X) volume, got shape {hu.shape}")
    return (attenuation(hu).sum(axis=1, dtype=np.float64) * float(spacing[1])).astype(np.float32)


def isotropic_shape(shape, spacing, size: int) -> tuple:
    """Pixels of an image of physical extent shape * spacing with square pixels and long side `size`."""
    extent = np.asarray(shape, float) * np.asarray(spacing, float)
    return tuple(max(1, int(round(e * size / extent.max()))) for e in extent)


def drr(hu: np.ndarray, spacing, size: int) -> np.ndarray:
    """(Z, Y, X) HU with voxel spacing (z, y, x) mm -> (H, W) float32 DRR: the line integral along Y at square
    pixels, long side `size`, superior at the top and the patient's right on the image's left.

    Projecting before resampling is exact (both are linear and act on different axes) and reads the volume
    once; downsampling averages areas (no aliasing), upsampling is bilinear.
    """
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"drr: invalid voxel spacing {spacing}")
    proj = line_integral(hu, spacing)  # (Z, X), pixels dz x dx mm
    shape = isotropic_shape(proj.shape, (spacing[0], spacing[2]), size)
    t = torch.from_numpy(proj)[None, None]
    down = tuple(min(a, b) for a, b in zip(shape, proj.shape))
    if down != proj.shape:
        t = F.interpolate(t, size=down, mode="area")
    if shape != down:
        t = F.interpolate(t, size=shape, mode="bilinear", align_corners=False)
    return t[0, 0].numpy()

