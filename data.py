"""Data for MultiMedVision (paper 2.4): the preprocessing shared by real images (read from disk by readers.py)
and phantom chests (rendered by phantom.py), a preprocessed cache, the `prepare` / `check` command line, and
`drr` (a radiograph of a CT, drr.py; beyond the paper). The multi-crop views (2.4.1) and the mixed 2D/3D loader
that read these Records are views.py's.

    python data.py check   --dataset mimic --root /data/mimic-cxr-jpg
    python data.py prepare --dataset mimic --root /data/mimic-cxr-jpg --out cache/mimic --workers 16
    python data.py prepare --dataset nih   --root /data/nih-cxr14 --out cache/nih     # public, labelled 2D
    python data.py prepare --dataset dicom --root /data/archive   --out cache/dicom   # CT series (pip install pydicom)
    python data.py prepare --dataset phantom --phantom phantom3d --n 512 --out cache/phantom3d
    python data.py drr /data/ct/series-folder drr.png                                 # a CT's frontal DRR

Every source yields a Record: image float32 (Z, H, W) in [-1, 1] (Z == 1 for a
2D image), the five LABELS as float32 with NaN where unknown, the modality and
a stable id (patient first, '/'-separated: "p10000032/s50414267").

Preprocessing (paper 2.4): X-ray: grayscale, long side resized to 224,
min-max to [-1, 1]. CT: Hounsfield units, in readers.py's orientation ((Z, Y, X):
superior -> inferior, anterior -> posterior, patient right -> left), resampled to
isotropic voxels with the voxel spacing (anatomy keeps its proportions),
long side 112, window L=250 W=2500 (HU -1000..1500) clipped to [-1, 1].

Cache (written by `prepare`, read by open_dataset):
    CACHE/index.json     {"format": 1, "name", "modality", "settings": {...},
                          "records": [{"key", "id", "split", "labels": [5 x float|null],
                                       "shape": [Z, H, W]}, ...], "n_failed"}
    CACHE/settings.json  the preprocessing settings; a rerun with others is refused
    CACHE/arrays/KEY.npy float16 (Z, H, W) in [-1, 1], memory-mapped when read
    CACHE/report.tsv     one line per raw file that could not be converted: path<TAB>error
Every file is written to a temporary name and renamed (atomic); a rerun
converts only what is missing.

Imports numpy, torch, tqdm, phantom, drr and readers; views.py imports this module, never the reverse.
"""
import argparse
import hashlib
import json
import math
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import drr
from phantom import PHANTOM_VERSION, PHANTOMS, phantom_rng, render, sample_patient
import readers

LABELS = readers.CHEXPERT_COLUMNS    # paper 2.4: the five labels, named and ordered as the CheXpert labeler's
XRAY_SIZE, CT_SIZE = 224, 112          # long side after preprocessing (paper 2.4)
WINDOW_LEVEL, WINDOW_WIDTH = 250.0, 2500.0  # CT window (paper 2.4)
PHANTOM_N = {"train": 1024, "test": 256}
# beyond the paper: the patients of a 3D phantom as radiographs, one patient both ways (same ids and labels)
PAIRED_SUFFIX = "-xray"
PAIRED_PHANTOMS = tuple(f"{name}{PAIRED_SUFFIX}" for name in PHANTOMS if "3d" in name)
CACHE_FORMAT = 1


@dataclass
class Record:
    image: np.ndarray   # float32 (Z, H, W) in [-1, 1], Z == 1 for 2D
    labels: np.ndarray  # float32 (5,), NaN unknown
    modality: str       # "2d" | "3d"
    id: str             # patient/study id, stable, used for splits and bootstrap


# ---------------------------------------------------------------- preprocessing

def window_ct(hu: np.ndarray) -> np.ndarray:
    """paper 2.4: window L=250, W=2500 -> [-1, 1] (HU -1000 -> -1, 250 -> 0, 1500 -> 1)."""
    lo = WINDOW_LEVEL - WINDOW_WIDTH / 2
    return np.clip((hu - lo) / WINDOW_WIDTH * 2 - 1, -1, 1).astype(np.float32)


def minmax(img: np.ndarray, where: str) -> np.ndarray:
    """paper 2.4: X-ray min-max to [-1, 1]."""
    lo, hi = float(img.min()), float(img.max())
    if not hi > lo:
        raise ValueError(f"{where}: constant image (all pixels {lo}), nothing to normalize")
    return ((img - lo) / (hi - lo) * 2 - 1).astype(np.float32)


def intensity_stats(ds, n: int = 64) -> list:
    """[mean, std] of the intensities of n samples spread evenly over ds (train.py --standardize)."""
    picks = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
    values = np.concatenate([ds[int(i)].image.ravel() for i in picks]).astype(np.float64)
    return [float(values.mean()), float(max(values.std(), 1e-6))]


def long_side_shape(shape, spacing, size: int) -> tuple:
    """Output shape with the longest physical extent mapped to `size` voxels, isotropic."""
    extent = [n * s for n, s in zip(shape, spacing)]
    voxel = max(extent) / size
    return tuple(max(1, round(e / voxel)) for e in extent)


def preprocess_xray(img, size: int, where: str) -> np.ndarray:
    """PIL image (any mode) -> float32 (1, H, W) in [-1, 1], long side `size`."""
    from PIL import Image
    if img.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        img = img.convert("L")
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"{where}: empty image {w}x{h}")
    new_h, new_w = long_side_shape((h, w), (1, 1), size)
    img = img.convert("F").resize((new_w, new_h), Image.BILINEAR)  # Pillow's resize is antialiased
    return minmax(np.asarray(img, dtype=np.float32), where)[None]


def resample_ct(hu: np.ndarray, spacing, size: int) -> np.ndarray:
    """(Z, Y, X) HU with voxel spacing (mm) -> isotropic voxels, long side `size`.

    Downsampling uses area averaging (no aliasing), upsampling trilinear.
    """
    shape = long_side_shape(hu.shape, spacing, size)
    t = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    down = tuple(min(a, b) for a, b in zip(shape, hu.shape))
    if down != hu.shape:
        t = F.interpolate(t, size=down, mode="area")
    if shape != down:
        t = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    return t[0, 0].numpy()


def preprocess_ct(hu: np.ndarray, spacing, size: int, where: str) -> np.ndarray:
    """(Z, Y, X) HU -> float32 (Z, Y, X) in [-1, 1]: resampled, long side `size`, windowed."""
    if hu.ndim != 3:
        raise ValueError(f"{where}: expected a (Z, Y, X) volume, got shape {hu.shape}")
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"{where}: invalid voxel spacing {spacing}")
    return window_ct(resample_ct(hu, spacing, size))


def validate_image(img: np.ndarray, where: str, min_side: int, is_3d: bool | None = None) -> np.ndarray:
    """Reject non-finite arrays and images with a patched side shorter than one patch.

    is_3d: what the dataset says the image is (None: Z > 1). A volume of one slice is refused, not
    taken for a radiograph: it would be cropped and packed as 2D under a 3D label.
    """
    if img.ndim != 3:
        raise ValueError(f"{where}: expected (Z, H, W), got shape {img.shape}")
    if not np.isfinite(img).all():
        raise ValueError(f"{where}: non-finite values")
    if is_3d and img.shape[0] < max(2, min_side):
        raise ValueError(f"{where}: a CT volume of {img.shape[0]} slice(s) {img.shape}: thinner than one patch")
    patched = img.shape if img.shape[0] > 1 else img.shape[1:]
    if min(patched) < min_side:
        raise ValueError(f"{where}: image {img.shape} is smaller than one {min_side}-pixel patch")
    return img


# ---------------------------------------------------------------- phantom chests (rendered by phantom.py)

def preprocess_phantom(raw: np.ndarray, modality: str, size: int) -> np.ndarray:
    """phantom.render's HU volume or line-integral radiograph -> float32 (Z, H, W) in [-1, 1], by the
    preprocessing of real images (paper 2.4). Rendered at the target size with isotropic voxels, so the
    resampling and resizing steps keep every value: phantom fingerprints are unchanged by this path."""
    if modality == "3d":
        return preprocess_ct(raw, (1.0, 1.0, 1.0), size, "phantom")
    from PIL import Image
    return preprocess_xray(Image.fromarray(raw), size, "phantom")


def phantom_modality(name: str, radiograph: bool = False) -> str:
    """A 3D phantom renders CT volumes, or its patients as radiographs; a 2D phantom renders radiographs."""
    return "3d" if "3d" in name and not radiograph else "2d"


def phantom_record(name: str, split: str, index: int, size: int, seed: int, radiograph: bool = False,
                   shifts=None) -> Record:
    """Sample `index` of a phantom split; rounded through float16 like a cache array. radiograph: the same
    patient of a 3D phantom as a frontal radiograph (same id and labels, same acquisition), for the paired
    cross-modal measurements (beyond the paper). shifts: the same patient acquired with only these of
    phantom.EXTERNAL_SHIFTS (controls.py --shifts); None: the phantom's own acquisition."""
    rng = phantom_rng(name, split, index, seed)
    p = sample_patient(rng)
    modality = phantom_modality(name, radiograph)
    external = name.endswith("-ext") if shifts is None else tuple(shifts)
    img = preprocess_phantom(render(p, rng, modality, size, external), modality, size)
    return Record(_float32(img.astype(np.float16)), p["labels"], modality, f"{name}-{split}-{index:06d}")


# ---------------------------------------------------------------- sources: raw files (readers.py) or phantoms

def sources_of(name: str, root, opt: readers.Options) -> list:
    """What `prepare` and `check` convert: a raw dataset's Sources (readers.scan) or the phantom's samples."""
    if name != "phantom":
        return readers.scan(name, root, opt)
    if opt.phantom not in PHANTOMS:
        raise ValueError(f"--phantom must be one of {PHANTOMS}, got {opt.phantom!r}")
    ds = {s: PhantomDataset(opt.phantom, s, n=n, size=opt.size or None, seed=opt.seed)
          for s, n in (("train", opt.n), ("test", max(1, opt.n // 4)))}
    return [readers.Source(readers.file_key(d.ids[i]), d.ids[i], s, d.labels[i], f"{opt.phantom}/{s}/{i}",
                           "phantom") for s, d in ds.items() for i in range(len(d))]


def dataset_modality(name: str, opt: readers.Options) -> str:
    if name == "phantom":
        return "3d" if "3d" in opt.phantom else "2d"
    return opt.dicom_modality if name == "dicom" else readers.MODALITY[name]


def load_source(src: readers.Source, opt: readers.Options) -> np.ndarray:
    """Decode (readers.py) and preprocess one raw file -> float32 (Z, H, W) in [-1, 1], validated."""
    if src.problem:
        raise ValueError(f"{src.path}: {src.problem}")
    size = opt.size or (XRAY_SIZE if src.kind in ("xray", "dicom-xray") or src.path.startswith("phantom2d") else CT_SIZE)
    if src.kind == "xray":
        from PIL import Image
        with Image.open(src.path) as im:
            scale = size / max(im.size)
            im.draft("L", (math.ceil(im.size[0] * scale), math.ceil(im.size[1] * scale)))  # JPEG: decode at reduced size
            img = preprocess_xray(im, size, src.path)
    elif src.kind in ("nifti", "npz", "dicom-ct"):
        hu, spacing = readers.read_ct(src, opt)
        img = preprocess_ct(hu, spacing, size, src.path)
    elif src.kind == "dicom-xray":
        from PIL import Image
        img = preprocess_xray(Image.fromarray(readers.read_dicom_xray(src.path)), size, src.path)
    else:
        name, split, index = src.path.split("/")
        img = phantom_record(name, split, int(index), size, opt.seed).image
    is_3d = src.kind in ("nifti", "npz", "dicom-ct") or src.path.startswith("phantom3d")
    return validate_image(img, src.path, opt.min_side, is_3d=is_3d)


# ---------------------------------------------------------------- cache: prepare and read

def atomic_write(path, write) -> None:
    """write(f) into a temporary binary file next to path, then rename: a reader never sees half a file.

    Every file the project writes goes through here (cache, checkpoints, logs' config, tables, figures).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash never leaves an empty file under the name
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, Ctrl-C) leaves nothing behind
        raise


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _float32(arr: np.ndarray) -> np.ndarray:
    """float16 -> float32 through torch (several times faster than numpy's conversion)."""
    return torch.from_numpy(np.array(arr, dtype=np.float16)).float().numpy()


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _npy_shape(path: Path):
    """Shape of a complete .npy file, None if it is missing or unreadable."""
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError, EOFError):
        return None


def _convert(task):
    """Worker: decode, preprocess and store one source; never raises."""
    i, src, opt, path = task
    try:
        img = load_source(src, opt)
        atomic_write(path, lambda f: np.save(f, img.astype(np.float16)))
        return i, img.shape, None
    except Exception as e:  # a corrupt file is reported, not fatal
        return i, None, f"{type(e).__name__}: {e}".replace("\n", " ")


def _init_worker():
    torch.set_num_threads(1)


def prepare(name: str, root, out, opt: readers.Options, workers: int = 1) -> dict:
    """Convert a raw dataset into a cache (see the module docstring); resumable.

    Returns {"converted", "reused", "failed": [(path, error)], "records"}.
    """
    sources = sources_of(name, root, opt)
    if not sources:
        raise FileNotFoundError(f"{root}: no {name} images found")
    keys = [s.key for s in sources]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"{root}: several files map to the same cache key, e.g. {dup}")
    modality = dataset_modality(name, opt)
    extra = {}
    if name == "ctrate":  # the version read, not "auto": v1 and v2 arrays share file names but not HU
        opt = replace(opt, ctrate_version=readers.ctrate_version(readers.ctrate_dir(Path(root)), opt))
        if opt.ctrate_version == "1":  # a v1 cache made under another reading of its axes is refused, not reused
            extra["ctrate_v1_axes"] = readers.CTRATE_V1_AXES
    out = Path(out)
    (out / "arrays").mkdir(parents=True, exist_ok=True)
    settings = {"dataset": name, "modality": modality, **asdict(opt),
                "size": opt.size or (CT_SIZE if modality == "3d" else XRAY_SIZE),
                "window": [WINDOW_LEVEL, WINDOW_WIDTH], "dtype": "float16",
                "orientation": "(Z, Y, X): superior->inferior, anterior->posterior, right->left", **extra}
    if (out / "settings.json").is_file():
        old = json.loads((out / "settings.json").read_text())
        if old != json.loads(json.dumps(settings)):
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise ValueError(f"{out}: prepared with other settings {diff}; use a new --out")
    else:
        _write_json(out / "settings.json", settings)
    shapes, todo = {}, []
    for i, src in enumerate(sources):
        path = out / "arrays" / f"{src.key}.npy"
        shapes[i] = _npy_shape(path)
        if shapes[i] is None:
            todo.append((i, src, opt, path))
    reused = len(sources) - len(todo)
    failed = []
    parallel = workers > 1 and len(todo) > 1
    with (multiprocessing.Pool(workers, initializer=_init_worker) if parallel else nullcontext()) as pool, \
            tqdm(total=len(todo), desc=f"prepare {name}", unit="file", disable=None if todo else True) as bar:  # None: no bar in a log file
        for i, shape, error in (pool.imap_unordered(_convert, todo) if parallel else map(_convert, todo)):
            shapes[i] = shape
            if error:
                failed.append((sources[i].path, error))
            bar.update(1)
            bar.set_postfix(failed=len(failed), refresh=False)
    failed.sort()
    atomic_write(out / "report.tsv", lambda f: f.write("".join(f"{p}\t{e}\n" for p, e in failed).encode()))
    records = [{"key": s.key, "id": s.id, "split": s.split, "shape": list(shapes[i]),
                "labels": [None if math.isnan(v) else float(v) for v in s.labels]}
               for i, s in enumerate(sources) if shapes[i] is not None]
    if not records:
        raise RuntimeError(f"{root}: nothing usable: all {len(sources)} files failed, e.g. {failed[0][1]} "
                           f"(all listed in {out / 'report.tsv'})")
    index_name = opt.phantom if name == "phantom" else name
    _write_json(out / "index.json", {"format": CACHE_FORMAT, "name": index_name, "modality": modality,
                                     "settings": settings, "records": records, "n_failed": len(failed)})
    summary = {"converted": len(todo) - len(failed), "reused": reused, "failed": failed, "records": len(records)}
    print(f"{out}: {len(records)} records ({summary['converted']} converted, {reused} already done), "
          f"{len(failed)} failed" + (f" (listed in {out / 'report.tsv'})" if failed else ""))
    return summary


SPLIT_ORDER = ("train", "validate", "valid", "test")


def _read_index(root: Path) -> dict:
    root = Path(root)
    path = root / "index.json"
    if not path.is_file():
        make = f"make one with `python data.py prepare`, or name a phantom {PHANTOMS}"
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such folder ({make})")
        if not root.is_dir():
            raise ValueError(f"{root}: a file, not a cache folder ({make})")
        if not any(root.iterdir()):
            raise ValueError(f"{root}: empty folder, not a cache ({make})")
        report = root / "report.tsv"
        failed = [line.split("\t", 1) for line in report.read_text().splitlines() if "\t" in line] \
            if report.is_file() and not any((root / "arrays").glob("*.npy")) else []
        if failed:  # prepare converted nothing: a rerun fails on the same files
            raise ValueError(f"{root}: `data.py prepare` could not convert any of its {len(failed)} files (e.g. "
                             f"{failed[0][0]}: {failed[0][1]}; all in {report}): rerunning it will not help; fix or "
                             f"remove those files, or check prepare's --dataset and --root")
        raise ValueError(f"{root}: no index.json, so not a finished cache (rerun `python data.py prepare` to finish it)")
    index = json.loads(path.read_text())
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: cache format {index.get('format')}, this data.py reads {CACHE_FORMAT}; prepare again")
    return index


def _splits_of(records) -> list:
    found = {r["split"] for r in records}
    return sorted(found, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))


ALL_SPLITS = "all"  # CacheDataset(root, ALL_SPLITS): every record (Table 1 tests on all of RAD-ChestCT, paper 2.4.1)


class CacheDataset(torch.utils.data.Dataset):
    """One split of a cache written by `prepare` (or all of it: ALL_SPLITS); items are Records read through a
    memory map."""

    def __init__(self, root, split: str):
        self.root = Path(root)
        index = _read_index(self.root)
        splits = _splits_of(index["records"])
        if split not in splits and split != ALL_SPLITS:
            raise ValueError(f"{root}: no split {split!r}; it has {splits}")
        self.records = [r for r in index["records"] if split in (r["split"], ALL_SPLITS)]
        self.name, self.modality, self.split = index["name"], index["modality"], split
        self.ids = [r["id"] for r in self.records]
        self.labels = np.array([[math.nan if v is None else v for v in r["labels"]] for r in self.records],
                               np.float32).reshape(-1, len(LABELS))
        self.fingerprint = _digest([index["settings"], self.name, split, self.records])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        r = self.records[i]
        path = self.root / "arrays" / f"{r['key']}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path}: unreadable cache array ({e})") from e
        if list(arr.shape) != r["shape"]:
            raise ValueError(f"{path}: shape {arr.shape}, index.json says {r['shape']}")
        image = validate_image(_float32(arr), str(path), 1, is_3d=self.modality == "3d")
        return Record(image, self.labels[i].copy(), self.modality, r["id"])


class PhantomDataset(torch.utils.data.Dataset):
    """A phantom split generated on the fly, deterministic by (seed, split, index), memoized.

    n: samples in the split (default PHANTOM_N); size: long side (default 224
    for 2D, 112 for 3D); memo_bytes: how much of the split each process keeps.
    """

    def __init__(self, name: str, split: str, n: int = None, size: int = None, seed: int = 0,
                 memo_bytes: int = 1 << 30, radiograph: bool = False, shifts=None):
        if name not in PHANTOMS:
            raise ValueError(f"unknown phantom {name!r}; one of {PHANTOMS}")
        if split not in ("train", "test"):
            raise ValueError(f"{name}: no split {split!r}; it has ['train', 'test']")
        if radiograph and "3d" not in name:
            raise ValueError(f"{name}: radiograph=True renders a 3D phantom's patients as radiographs")
        self.split, self.seed, self.radiograph, self.phantom = split, seed, radiograph, name
        self.shifts = None if shifts is None else tuple(shifts)
        self.name = f"{name}{PAIRED_SUFFIX}" if radiograph else name
        if self.shifts is not None:  # same patients, another acquisition: another name and fingerprint
            self.name += f"[{'+'.join(self.shifts) or 'no shift'}]"
        self.modality = phantom_modality(name, radiograph)
        self.n = PHANTOM_N[split] if n is None else int(n)
        self.size = size or (CT_SIZE if self.modality == "3d" else XRAY_SIZE)
        self.ids = [f"{name}-{split}-{i:06d}" for i in range(self.n)]  # a paired radiograph has its CT's id
        self.fingerprint = _digest([PHANTOM_VERSION, name, split, self.n, self.size, seed, *(["xray"] * radiograph),
                                    *([list(self.shifts)] if self.shifts is not None else [])])
        self._labels, self._memo, self._memo_left = None, {}, memo_bytes

    @property
    def labels(self) -> np.ndarray:  # (n, 5), from the patients' parameters: no rendering
        if self._labels is None:
            self._labels = np.stack([sample_patient(phantom_rng(self.phantom, self.split, i, self.seed))["labels"]
                                     for i in range(self.n)]).reshape(-1, len(LABELS))
        return self._labels

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Record:
        if not 0 <= i < self.n:
            raise IndexError(f"{self.name}/{self.split}: index {i} out of range({self.n})")
        if i in self._memo:
            image, labels = self._memo[i]
            return Record(_float32(image), labels, self.modality, self.ids[i])
        rec = phantom_record(self.phantom, self.split, i, self.size, self.seed, self.radiograph, self.shifts)
        if rec.image.size * 2 <= self._memo_left:
            self._memo[i] = (rec.image.astype(np.float16), rec.labels)
            self._memo_left -= rec.image.size * 2
        return rec


def open_dataset(spec: str, split: str, **phantom_options) -> torch.utils.data.Dataset:
    """A phantom name (options n, size, seed), a 3D phantom's patients as radiographs ("phantom3d-xray",
    PAIRED_PHANTOMS) or a cache directory from `python data.py prepare`."""
    if spec in PHANTOMS:
        return PhantomDataset(spec, split, **phantom_options)
    if spec in PAIRED_PHANTOMS:
        return PhantomDataset(spec[: -len(PAIRED_SUFFIX)], split, radiograph=True, **phantom_options)
    if phantom_options:
        raise ValueError(f"{spec}: options {sorted(phantom_options)} apply to phantom datasets only")
    return CacheDataset(spec, split)


def list_splits(spec: str) -> list:
    return ["train", "test"] if spec in PHANTOMS or spec in PAIRED_PHANTOMS else _splits_of(_read_index(Path(spec))["records"])


def describe(spec: str, **phantom_options) -> dict:
    """{"name", "modality", "splits": {split: count}, "prevalence": {split: [5 floats, NaN-aware]}}."""
    sets = [open_dataset(spec, s, **phantom_options) for s in list_splits(spec)]
    return {"name": sets[0].name, "modality": sets[0].modality,
            "splits": {d.split: len(d) for d in sets},
            "prevalence": {d.split: _prevalence(d.labels) if len(d) else [] for d in sets}}


def _prevalence(labels: np.ndarray) -> list:
    """Fraction positive among the known labels, per label; NaN for a label never known (NIH's Lung Opacity)."""
    known = (~np.isnan(labels)).sum(0)
    return [float(np.nansum(col) / k) if k else math.nan for col, k in zip(labels.T, known)]


# ---------------------------------------------------------------- DRR: a radiograph of a CT (beyond the paper, drr.py)

def hu_of_window(img: np.ndarray) -> np.ndarray:
    """window_ct inverted: a preprocessed CT (Z, Y, X) in [-1, 1] back to HU (exact within -1000..1500 HU)."""
    return (img.astype(np.float32) + 1) / 2 * WINDOW_WIDTH + WINDOW_LEVEL - WINDOW_WIDTH / 2


def drr_record(record: Record, size: int = XRAY_SIZE) -> Record:
    """The DRR of a preprocessed CT record (cache or phantom: isotropic voxels) as a radiograph record of the same
    patient, preprocessed as an X-ray is (paper 2.4: long side `size`, min-max to [-1, 1]); same labels and id."""
    if record.modality != "3d":
        raise ValueError(f"{record.id}: a DRR needs a CT volume, got a {record.modality} image")
    image = minmax(drr.drr(hu_of_window(record.image), (1.0, 1.0, 1.0), size), record.id)[None]
    return Record(image, record.labels, "2d", record.id)


class DrrDataset(torch.utils.data.Dataset):
    """The DRRs of a CT dataset (a cache or a phantom) as radiographs of the same patients: same ids, labels."""

    def __init__(self, ct, size: int = XRAY_SIZE):
        if getattr(ct, "modality", "3d") != "3d":
            raise ValueError(f"{ct.name}: DRRs need CT volumes, this dataset holds {ct.modality} images")
        self.ct, self.size, self.modality = ct, size, "2d"
        self.name, self.split, self.ids, self.labels = f"{ct.name}-drr", ct.split, ct.ids, ct.labels
        self.fingerprint = _digest(["drr", ct.fingerprint, size])

    def __len__(self) -> int:
        return len(self.ct)

    def __getitem__(self, i: int) -> Record:
        return drr_record(self.ct[i], self.size)


def drr_file(path: str, out: str, size: int = XRAY_SIZE, beside: bool = False) -> np.ndarray:
    """`data.py drr`: a NIfTI volume or a folder holding one DICOM CT series -> OUT.png, its frontal DRR at long
    side `size` (raw HU, spacing and orientation as `prepare` reads them: readers.read_ct). beside: the coronal
    slice through the volume's middle, windowed as the model sees CT (paper 2.4), to the right of the film at
    the same scale and orientation."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found")
    if os.path.isdir(path):
        found = [s for s in readers.scan_dicom(Path(path), readers.Options(dicom_modality="3d"))
                 if s.kind == "dicom-ct"]
        usable = [s for s in found if not s.problem]
        if not usable:
            why = f": {found[0].problem}" if found else ""
            raise ValueError(f"{path}: no readable DICOM CT series in this folder{why}")
        if len(usable) > 1:
            raise ValueError(f"{path}: {len(usable)} CT series in this folder; name the folder of one")
        src = usable[0]
    elif path.lower().endswith((".nii", ".nii.gz")):
        src = readers.Source(path, path, "", np.full(len(LABELS), np.nan, np.float32), path, "nifti")
    else:
        raise ValueError(f"{path}: not a NIfTI volume (.nii, .nii.gz) or a folder holding a DICOM CT series")
    hu, spacing = readers.read_ct(src, readers.Options())
    image = drr.drr(hu, spacing, size)
    from PIL import Image
    film = np.round((minmax(image, path) + 1) * 127.5).astype(np.uint8)  # dense = bright, as an X-ray is stored
    if beside:
        coronal = torch.from_numpy(np.ascontiguousarray(window_ct(hu[:, hu.shape[1] // 2, :])))[None, None]
        coronal = F.interpolate(coronal, size=image.shape, mode="bilinear", antialias=True, align_corners=False)
        gap = np.zeros((film.shape[0], 4), np.uint8)
        film = np.concatenate([film, gap, np.round((coronal[0, 0].numpy() + 1) * 127.5).astype(np.uint8)], axis=1)
    atomic_write(out, lambda f: Image.fromarray(film).save(f, format="PNG"))
    return image


# ---------------------------------------------------------------- command line

def check(name: str, root, opt: readers.Options, full: bool = False) -> dict:
    """What a dataset holds before a long run: counts, label prevalence and every problem with its path."""
    sources = sources_of(name, root, opt)
    problems = []
    for src in tqdm(sources, desc=f"check {name}", unit="file", disable=None if len(sources) >= 100 else True):
        try:
            if src.problem:
                raise ValueError(src.problem)
            if src.kind not in ("phantom", "dicom-ct") and not Path(src.path).is_file():
                raise FileNotFoundError("file not found")
            load_source(src, opt) if full else readers.peek(src)
        except Exception as e:
            problems.append((src.path, f"{type(e).__name__}: {e}"))
    splits = {s: [x for x in sources if x.split == s] for s in _splits_of([{"split": x.split} for x in sources])}
    labels = {s: {label: [int((y == 1).sum()), int((y == 0).sum()), int(np.isnan(y).sum())]
                  for label, y in zip(LABELS, np.stack([x.labels for x in xs]).T)} for s, xs in splits.items()}
    unit = "series or files" if name == "dicom" else "files"
    bad = {p for p, _ in problems}
    usable = {s: sum(x.path not in bad for x in xs) for s, xs in splits.items()}
    print(f"{name} at {root}: {len(sources)} {unit}, {len(problems)} with problems")
    for s, xs in splits.items():
        paper = readers.PAPER_N.get((name, s))
        print(f"  {s or '(no split)'}: {len(xs)}, {usable[s]} usable" + (f"  (paper 2.4.1: n={paper:,})" if paper else ""))
        if all(pos + neg == 0 for pos, neg, _ in labels[s].values()):  # DICOM, folders: no label table to read
            print(f"    labels: none of the five is known ({name} brings no label table): for pretraining, not probes")
            continue
        for label, (pos, neg, unk) in labels[s].items():
            print(f"    {label:17s} positive {pos:7d}  negative {neg:7d}  unknown {unk:7d}")
    if name == "dicom":  # what was found, series by series: a user checks an archive before converting it
        for src in sources:
            size = f"{len(src.files)} files" if src.files else "1 file"
            state = "problem (below)" if src.path in bad else "usable"
            print(f"  {'CT series' if src.kind == 'dicom-ct' else 'radiograph'} {src.path}: {size}, {state}")
    if (name, "all") in readers.PAPER_N:  # RAD-ChestCT: Table 1 tests on every split
        print(f"  all splits: {len(sources)}, {sum(usable.values())} usable  (paper 2.4.1: n={readers.PAPER_N[name, 'all']:,})")
    for path, error in problems:
        print(f"  problem: {path}: {error}")
    return {"splits": {s: len(xs) for s, xs in splits.items()}, "usable": usable, "labels": labels,
            "problems": problems}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Prepare (convert once into a cache) or check a dataset.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{prepare,check,drr}")
    helps = {"prepare": "convert a raw dataset once into a cache of preprocessed arrays that training and probing "
                        "read (parallel, resumable; failures listed in OUT/report.tsv)",
             "check": "what a raw dataset holds, before a long run: counts, label prevalence per split, and every "
                      "unreadable file with its path"}
    for command in ("prepare", "check"):
        p = sub.add_parser(command, help=helps[command], description=helps[command][0].upper() + helps[command][1:] + ".")
        p.add_argument("--dataset", required=True, choices=[*readers.MODALITY, "phantom"], help="which reader (phantom: the built-in phantom chests)")
        p.add_argument("--root", default="", help="raw dataset folder (not needed for phantom)")
        p.add_argument("--size", type=int, default=0, help="long side; default 224 (2D) / 112 (3D), paper 2.4")
        p.add_argument("--min-side", type=int, default=14, help="reject images with a side shorter than this (one patch; default: %(default)s)")
        readers.add_arguments(p)
        p.add_argument("--phantom", choices=PHANTOMS, default="phantom2d", help="phantom: which one (default: %(default)s)")
        p.add_argument("--n", type=int, default=1024, help="phantom: train samples (test: n // 4; default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="phantom: seed; patient splits made here (MIMIC paper, "
                       "NIH without lists): their seed (default: %(default)s)")
        if command == "prepare":
            p.add_argument("--out", required=True, help="cache folder")
            p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="conversion processes (default: %(default)s, the CPUs)")
        else:
            p.add_argument("--full", action="store_true", help="decode every file, not only headers")
    drr_help = ("a digitally reconstructed radiograph of a CT: the frontal (anterior-posterior) line integral of "
                "attenuation from HU, as a chest film is read (patient's right on the image's left, superior at the "
                "top, dense tissue bright); no scatter or detector response: a stand-in for a radiograph (drr.py)")
    p = sub.add_parser("drr", help=drr_help, description=drr_help[0].upper() + drr_help[1:] + ".")
    p.add_argument("input", metavar="INPUT", help="a NIfTI volume (.nii, .nii.gz) or a folder holding one DICOM CT series")
    p.add_argument("out", metavar="OUT.png", help="the radiograph to write (8-bit PNG)")
    p.add_argument("--size", type=int, default=XRAY_SIZE, help="long side in pixels (default: %(default)s, the X-ray's, paper 2.4)")
    p.add_argument("--beside", action="store_true", help="the coronal slice through the volume's middle to the right of "
                   "the film, same scale and orientation (windowed as the model sees CT)")
    args = ap.parse_args(argv)
    if args.command == "drr":
        try:
            image = drr_file(args.input, args.out, args.size, args.beside)
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"data.py drr: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}: {image.shape[0]} x {image.shape[1]} DRR of {args.input}")
        return 0
    opt = readers.Options(**{f.name: getattr(args, f.name) for f in fields(readers.Options)})  # every field is a flag
    try:  # a user's mistake (missing root, table or column, no pydicom) is one line, not a traceback
        if args.command == "prepare":
            prepare(args.dataset, args.root, args.out, opt, args.workers)
            return 0
        return 0 if len(check(args.dataset, args.root, opt, args.full)["problems"]) == 0 else 1
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"data.py {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
