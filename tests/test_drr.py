"""DRR (drr.py, data.py drr): the line integral of attenuation through a CT, shown as a chest film is read."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import drr
import readers

CT_SAMPLE = "ct-dicom/Lung_Dx-A0002-B40f"


def real(name: str) -> Path:
    """A sample of ../shared/real (beside the repo) or $MMV_REAL; the test skips where it is absent."""
    root = Path(os.environ.get("MMV_REAL") or Path(__file__).resolve().parents[1] / ".." / "shared" / "real")
    if not (root / name).exists():
        pytest.skip(f"real sample {root / name} not found")
    return root / name


def test_drr_shows_superior_at_the_top_and_the_patients_right_on_the_images_left():
    """A dense block superior, anterior and on the patient's right lands in the image's top-left corner."""
    hu = np.full((20, 16, 30), -1000.0, np.float32)  # (Z, Y, X): superior -> inferior, anterior -> posterior, right -> left
    hu[2:6, 1:4, 3:8] = 1000.0
    image = drr.drr(hu, (1.0, 1.0, 1.0), size=30)
    assert image.shape == (20, 30)
    assert np.unravel_index(image.argmax(), image.shape)[0] < 6 and np.unravel_index(image.argmax(), image.shape)[1] < 8
    assert image[2:6, 3:8].min() == pytest.approx(3 * 2.0)  # 3 voxels of 1000 HU: twice water's attenuation each
    assert image[10:, 15:].max() == 0.0  # air attenuates nothing


def test_drr_pixels_are_square_whatever_the_voxel_spacing():
    """A 40 mm x 120 mm (Z x X) slab gives a 1:3 image, however the voxels sample it."""
    a = drr.drr(np.zeros((8, 5, 24), np.float32), (5.0, 2.0, 5.0), size=60)
    b = drr.drr(np.zeros((40, 5, 60), np.float32), (1.0, 2.0, 2.0), size=60)
    assert a.shape == b.shape == (20, 60)
    assert np.allclose(a, 10.0) and np.allclose(b, 10.0)  # 5 voxels x 2 mm of water


def test_drr_of_a_real_ct_equals_a_direct_reading_of_its_dicom_files():
    """readers.py's volume through drr.line_integral == the HU of the DICOM files summed along their rows, read with
    pydicom alone (slices by ImagePositionPatient, superior first); this series' rows run anterior -> posterior and
    its columns towards the patient's left (ImageOrientationPatient 1,0,0,0,1,0)."""
    pydicom = pytest.importorskip("pydicom")
    folder = real(CT_SAMPLE)
    slices = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    assert all([float(v) for v in s.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0] for s in slices)
    slices.sort(key=lambda s: -float(s.ImagePositionPatient[2]))  # LPS z grows superior: superior first
    hu = np.stack([s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices])
    row_mm = float(slices[0].PixelSpacing[0])
    direct = np.maximum(1 + hu / 1000, 0).sum(axis=1) * row_mm  # (Z, X): along the rows, anterior -> posterior

    src = next(s for s in readers.scan_dicom(folder, readers.Options()) if s.kind == "dicom-ct")
    volume, spacing = readers.read_ct(src, readers.Options())
    assert np.allclose(drr.line_integral(volume, spacing), direct, rtol=1e-5, atol=1e-2)

    image = drr.drr(volume, spacing, size=224)  # 30 x 8 mm by 512 x 0.646 mm: 240 x 331 mm
    assert image.shape == (round(240 / 331 * 224), 224)
    # in-plane: 512 columns averaged down to 224, then the 30 slices up to 162 rows
    t = F.interpolate(torch.from_numpy(direct.astype(np.float32))[None, None], size=(30, 224), mode="area")
    expected = F.interpolate(t, size=image.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.allclose(image, expected, rtol=1e-4, atol=1e-2)


def test_drr_of_a_real_ct_shows_its_anatomy_where_a_chest_film_does():
    """The known anatomy of the sample series: the spine posterior, the abdomen (liver) below the lungs, and the
    heart on the patient's left, which a frontal film shows on the image's right."""
    folder = real(CT_SAMPLE)
    pytest.importorskip("pydicom")
    src = next(s for s in readers.scan_dicom(folder, readers.Options()) if s.kind == "dicom-ct")
    hu, spacing = readers.read_ct(src, readers.Options())
    y = np.arange(hu.shape[1])[None, :, None]
    bone, body = hu > 300, hu > -500
    assert (bone * y).sum() / bone.sum() > (body * y).sum() / body.sum() + 30  # vertebrae behind the body's centre
    image = drr.drr(hu, spacing, size=224)
    h = image.shape[0]
    assert image[-h // 6:].mean() > image[h // 4: h // 2].mean()  # abdomen below, aerated lungs above
    # the heart: the soft tissue (0-100 HU) of the anterior mediastinum at its level, 2/3 down this series
    k = round(2 / 3 * hu.shape[0])
    xs = np.where(body[k].any(axis=0))[0]
    centre = (xs[0] + xs[-1]) / 2
    heart = (hu[k] > 0) & (hu[k] < 100)
    heart[hu.shape[1] // 2:] = False  # anterior half
    heart[:, : int(centre) - 40] = heart[:, int(centre) + 120:] = False  # the mediastinum and to its left, not the liver
    cols = np.where(heart.any(axis=0))[0]
    assert cols.mean() > centre + 20  # more than 13 mm to the patient's left of the midline


def test_data_py_drr_writes_the_film_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    folder = real(CT_SAMPLE)
    pytest.importorskip("pydicom")
    out = tmp_path / "drr.png"
    assert data.main(["drr", str(folder), str(out), "--size", "112"]) == 0
    src = next(s for s in readers.scan_dicom(folder, readers.Options()) if s.kind == "dicom-ct")
    image = drr.drr(*readers.read_ct(src, readers.Options()), size=112)
    expected = np.round((data.minmax(image, "drr") + 1) * 127.5).astype(np.uint8)  # the X-ray min-max, 8 bits
    assert np.array_equal(np.asarray(Image.open(out)), expected)
    for bad, why in ((tmp_path / "nothing-here", "not found"), (out, "not a NIfTI volume")):
        assert data.main(["drr", str(bad), str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(bad) in err and why in err
    assert not (tmp_path / "x.png").exists()


def test_drr_of_a_nifti_volume_matches_its_array(tmp_path):
    """A NIfTI file (RAS affine, 2 x 1 x 1 mm) through data.py drr == drr.drr of the array in our orientation."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    ras = rng.uniform(-1000, 500, (30, 20, 10)).astype(np.float32)  # (R->, A->, S->) voxels
    nib.save(nib.Nifti1Image(ras, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    image = data.drr_file(str(tmp_path / "ct.nii.gz"), str(tmp_path / "ct.png"), size=30)
    zyx = ras.transpose(2, 1, 0)[::-1, ::-1, ::-1]  # superior->inferior, anterior->posterior, right->left
    assert np.allclose(image, drr.drr(np.ascontiguousarray(zyx), (2.0, 1.0, 1.0), 30), atol=1e-3)


def test_beside_puts_the_middle_coronal_slice_right_of_the_film_in_its_geometry(tmp_path):
    """--beside: the film as without it, 4 black columns, then the coronal slice through the middle (the anterior-
    posterior axis halved) windowed as the model sees CT, resampled onto the film's square pixels."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    ras = rng.uniform(-1000, 500, (30, 20, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(ras, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    data.drr_file(str(tmp_path / "ct.nii.gz"), str(tmp_path / "film.png"), size=30)
    assert data.main(["drr", str(tmp_path / "ct.nii.gz"), str(tmp_path / "both.png"), "--size", "30", "--beside"]) == 0
    film, both = (np.array(Image.open(tmp_path / f)) for f in ("film.png", "both.png"))
    h, w = film.shape
    assert both.shape == (h, 2 * w + 4) and np.array_equal(both[:, :w], film) and not both[:, w:w + 4].any()
    zyx = ras.transpose(2, 1, 0)[::-1, ::-1, ::-1]
    coronal = torch.from_numpy(np.ascontiguousarray(data.window_ct(zyx[:, zyx.shape[1] // 2, :])))[None, None]
    expected = F.interpolate(coronal, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    assert np.abs(both[:, w + 4:].astype(float) - (expected.numpy() + 1) * 127.5).max() <= 1


def test_drr_record_of_a_cached_ct_is_a_radiograph_of_the_same_patient():
    """A preprocessed CT record back to HU (the window inverted) gives a 2D record with the same id and labels."""
    ct = data.open_dataset("phantom3d", "test", n=2, size=28)[0]
    assert np.allclose(data.window_ct(data.hu_of_window(ct.image)), ct.image, atol=1e-6)
    xray = data.drr_record(ct, size=56)
    assert xray.modality == "2d" and xray.id == ct.id and np.array_equal(xray.labels, ct.labels, equal_nan=True)
    assert xray.image.shape[0] == 1 and max(xray.image.shape) == 56
    assert xray.image.min() == -1 and xray.image.max() == 1
    with pytest.raises(ValueError, match="needs a CT volume"):
        data.drr_record(xray)
