"""Frozen features (paper 3): what the linear probes see, from checkpoints, from files, and of your own images.

    python probe.py embed --ckpt CKPT --out FILE.npz INPUT...     embeddings of your own images (embed below)

- Checkpoints: load_checkpoints reads train.py's checkpoints (named S<stage> or Supervised), random_init is the
  same architecture at a seeded random initialisation (the control every trained row must beat).
- Features: each sample whole (views.whole_view: one view per image or volume, snapped to whole patches), in
  packed batches under a token budget, through the frozen backbone: the backbone embedding, not the projector
  (paper 2.2, 3). cached_features stores them per (checkpoint, dataset fingerprint, split, precision, feature
  code), so a fix to the code that makes a feature never leaves stale ones behind.
- Embeddings files: the .npz format (ids (N,), x (N, D)) that `probe.py --features` reads, for another encoder's
  features, and that `probe.py embed` writes, for radiographs (PNG/JPG, DICOM) and CT (NIfTI, DICOM series)
  decoded and preprocessed as `python data.py prepare` does (paper 2.4). An input that cannot be read is
  skipped, named and counted (Unreadable), the rest written.

`probe.py --features NAME=DIR` puts another encoder through the same probes, splits, C selection and bootstrap.
DIR holds one DATASET_SPLIT.npz per dataset and split, named by our dataset name and split (mimic_train.npz,
mimic_test.npz, chexpert_test.npz, ctrate_train.npz, ctrate_valid.npz, radchest_train.npz, radchest_test.npz;
phantom2d_train.npz, ...), each with `ids` (N,) str, our cache's record ids, and `x` (N, D) float, D the same in
every file. Rows may come in any order, ids not in the split are ignored, and labels and patients come from our
cache, never from the file. A missing or duplicate id, a non-finite value, a width that differs between files or
an unreadable file stops the run with one line naming the file. A DIR of 2D files only (a 2D encoder) gets LP 2D
rows on the 2D test sets, as the paper's BiomedCLIP rows. Reading the images from our caches gives the encoder
exactly the probe's images and ids:

    for split in data.list_splits("cache/mimic"):
        ds = data.open_dataset("cache/mimic", split)  # ds[i].image: (1, H, W) in [-1, 1]; a CT cache: (Z, Y, X)
        x = np.stack([my_encoder(ds[i].image) for i in range(len(ds))])  # your encoder and its preprocessing
        features.write_embeddings(features.features_path("feats/mine", ds), {"ids": ds.ids, "x": x})

Imports model, data, views, readers, numpy, torch and tqdm; pydicom only where DICOM files are embedded.
probe.py imports this module; nothing here imports probe.py.
"""
import argparse
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import readers
from model import SparseMedicalViT, backbone_from_checkpoint
from views import _patched, whole_view  # _patched: its source is part of feature_code_digest

# ---------------------------------------------------------------- checkpoints

@dataclass
class Checkpoint:
    name: str
    path: str
    model: SparseMedicalViT
    key: str  # content hash + model config: names its cached features
    train_args: dict  # train.py's arguments, as saved in the checkpoint


def checkpoint_name(args: dict, path: str) -> str:
    if args.get("objective") == "supervised":
        return "Supervised"
    return f"S{args['stage']}" if args.get("stage") else os.path.splitext(os.path.basename(path))[0]


def named(item: str) -> tuple:
    """A command-line item `NAME=PATH` -> (NAME, PATH); a plain PATH (even one with '=' in it) -> (None, PATH)."""
    name, sep, path = item.partition("=")
    if not sep or os.path.exists(item) or os.sep in name:
        return None, item
    return name, path


def train_sizes(args, train_args: dict):
    """--size-2d/--size-3d left unset: the long sides the model was trained on (paper 2.4), if it says."""
    for key in ("size_2d", "size_3d"):
        if getattr(args, key) is None:
            setattr(args, key, train_args.get(key))


def load_checkpoints(items: list, attn: str) -> list:
    """`--ckpt PATH` or `NAME=PATH` items -> Checkpoints; clear errors from model.load_checkpoint."""
    out = []
    for item in items:
        name, path = named(item)
        model, ckpt = backbone_from_checkpoint(path, "cpu", attn=attn)
        name = name or checkpoint_name(ckpt.get("args") or {}, path)
        if name in {c.name for c in out}:
            name = f"{name}#{len(out) + 1}"
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        key = digest + json.dumps(ckpt["model_config"], sort_keys=True)
        out.append(Checkpoint(name, path, model, key, ckpt.get("args") or {}))
    return out


def random_init(first: Checkpoint, attn: str, seed: int) -> Checkpoint:
    """The control every trained row needs: the first checkpoint's architecture at a random initialisation
    (the model's own init, seeded), through the same probes. A method that learned nothing scores here."""
    torch.manual_seed(seed)
    config = {k: v for k, v in first.model.config.items() if k != "attn"}
    model = SparseMedicalViT(**config, attn=attn).eval()
    key = f"random-init-seed{seed}" + json.dumps(config, sort_keys=True)
    return Checkpoint("Random init", "", model, key, first.train_args)  # no file, no training curves


def _identity(x):
    return x


def read_records(ds, workers: int):
    """The records of ds in order; workers > 0 reads/renders them in background processes."""
    if workers == 0:
        return (ds[i] for i in range(len(ds)))
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_identity))


@dataclass
class Unreadable:
    """What ImageFiles gives for an input it cannot read (in place of a Record, so that worker processes carry it
    too): the input and why."""
    path: str
    problem: str  # the decoder's message, one line

    def __str__(self) -> str:  # one line that names the file once
        return self.problem if self.path in self.problem else f"{self.path}: {self.problem}"


def whole_views(ds, patch: int, batch_tokens: int, workers: int = 0, skipped: list = None):
    """Yield (views, records): whole images/volumes (1, Z, H, W) of at most batch_tokens tokens together.

    An Unreadable input is appended to skipped and named on stderr as it is met; without a skipped list it is
    the error (ValueError, its one line)."""
    views, records, tokens = [], [], 0
    for record in read_records(ds, workers):
        if isinstance(record, Unreadable):
            if skipped is None:
                raise ValueError(str(record))
            skipped.append(record)
            tqdm.write(f"skipping {record.path}: {record.problem}", file=sys.stderr)
            continue
        view = whole_view(record, patch)
        n = view.numel() // (patch ** (3 if view.shape[1] > 1 else 2))
        if views and tokens + n > batch_tokens:
            yield views, records
            views, records, tokens = [], [], 0
        views.append(view)
        records.append(record)
        tokens += n
    if views:
        yield views, records


def extract_features(model: SparseMedicalViT, ds, batch_tokens: int, workers: int = 0, skipped: list = None) -> dict:
    """Frozen backbone embeddings (N, dim) of every sample, on the model's device, with labels (N, L) and ids (N,);
    with a skipped list, the inputs that cannot be read are left out and listed there (whole_views)."""
    return extract_features_of([model], ds, batch_tokens, workers, skipped)[0]


def extract_features_of(models: list, ds, batch_tokens: int, workers: int = 0, skipped: list = None) -> list[dict]:
    """extract_features of several models (one patch size) from one reading of ds: each record is decoded or
    rendered once for all of them (rendering the phantoms takes longer than embedding them on a CPU)."""
    if len(ds) == 0:
        raise ValueError(f"{ds.name} {ds.split}: no samples")
    feats, labels, ids = [[np.zeros((0, m.dim), np.float32)] for m in models], [], []
    with tqdm(total=len(ds), desc=f"features {ds.name}" + (f"/{ds.split}" if ds.split else ""), unit="img",
              leave=False, disable=None) as bar:  # None: no bar when stderr is not a terminal (a log file)
        for views, records in whole_views(ds, models[0].patch, batch_tokens, workers, skipped):
            for out, model in zip(feats, models):
                out.append(model.encode(views).numpy())
            labels += [r.labels for r in records]
            ids += [r.id for r in records]
            bar.update(len(views))
    y = np.stack(labels).astype(np.float32) if labels else np.zeros((0, len(data.LABELS)), np.float32)
    ids = np.array(ids, dtype=str)
    return [{"x": np.concatenate(out), "y": y, "ids": ids} for out in feats]


@functools.lru_cache(maxsize=1)  # the same for every (checkpoint, dataset) of a run: read the sources once
def feature_code_digest() -> str:
    """The code that turns a stored record into a feature: model.py, rope3d.py, pack.py, views.whole_view, and
    phantom.py, which makes the phantom records (the phantom fingerprint counts only PHANTOM_VERSION).

    Part of the cache key, so a fix to any of them never leaves stale features behind.
    """
    sources = [inspect.getsource(sys.modules[name]) for name in ("model", "rope3d", "pack", "phantom")]
    sources += [inspect.getsource(fn) for fn in (whole_view, _patched)]
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()


def cached_features(checkpoints: list, ds, device: torch.device, batch_tokens: int, workers: int,
                    cache_dir: str) -> list[dict]:
    """extract_features of each checkpoint, stored as .npz per (checkpoint content + config, dataset fingerprint,
    split, precision, feature code); those not cached are extracted together, one reading of ds per patch size."""
    precision = "bf16" if device.type == "cuda" else "fp32"
    feats, todo = {}, {}
    for i, ck in enumerate(checkpoints):
        key = f"{ck.key}|{ds.fingerprint}|{ds.split}|{precision}|{feature_code_digest()}"
        key = hashlib.sha256(key.encode()).hexdigest()[:24]
        path = os.path.join(cache_dir, re.sub(r"[^\w.-]", "_", f"{ds.name}_{ds.split}_{key}") + ".npz")
        if os.path.exists(path):
            with np.load(path) as f:
                feats[i] = {k: f[k] for k in f.files}
        else:
            todo.setdefault(ck.model.patch, []).append((i, path))
    for group in todo.values():
        models = [checkpoints[i].model.to(device) for i, _ in group]
        for (i, path), f in zip(group, extract_features_of(models, ds, batch_tokens, workers)):
            os.makedirs(cache_dir, exist_ok=True)
            data.atomic_write(path, lambda out: np.savez(out, **f))
            feats[i] = f
        for model in models:
            model.cpu()
    return [feats[i] for i in range(len(checkpoints))]



def stack(parts: list) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in ("x", "y", "ids")}



# ---------------------------------------------------------------- embeddings files (--features, embed)

def write_embeddings(path: str, feats: dict, **extra):
    """The embeddings file that --features reads and `probe.py embed` writes (format: this module's docstring): ids (N,) str and x (N, D) float32, plus any extra arrays (ignored by --features)."""
    arrays = {**extra, **feats, "ids": np.asarray(feats["ids"], dtype=str), "x": np.asarray(feats["x"], np.float32)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data.atomic_write(path, lambda f: np.savez(f, **arrays))


def read_embeddings(path: str) -> tuple:
    """(ids (N,) str, x (N, D) float32) of an embeddings file; anything wrong is a ValueError naming the file."""
    try:
        f = np.load(path, allow_pickle=False)  # no pickle: reading a file never runs code
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive of named arrays")
        with f:
            arrays, found = {k: f[k] for k in ("ids", "x") if k in f.files}, f.files
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({str(e).splitlines()[0]})") from e
    missing = [k for k in ("ids", "x") if k not in arrays]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(repr(k) for k in missing)} array (found {found}); "
                         "an embeddings file holds ids (N,) and x (N, D)")
    ids, x = arrays["ids"], arrays["x"]
    if ids.ndim != 1 or x.ndim != 2 or len(ids) != len(x) or x.shape[1] == 0:
        raise ValueError(f"{path}: ids {ids.shape} and x {x.shape} should be (N,) and (N, D) with D > 0")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{path}: x holds {x.dtype}, not numbers")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: non-finite values in {int(bad.sum())} row(s), e.g. id {str(ids[bad][0])!r}")
    ids = ids.astype(str)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{path}: id {str(uniq[counts > 1][0])!r} appears {counts.max()} times; ids must be unique")
    return ids, x


def features_path(folder: str, ds) -> str:
    """--features DIR holds one file per (dataset, split), named by our dataset name and split: mimic_test.npz."""
    return os.path.join(folder, f"{ds.name}_{ds.split}.npz")


def external_features(path: str, ds) -> dict:
    """The rows of an embeddings file for every sample of ds, in ds's order, with ds's labels and ids: the
    probe sees exactly the samples, labels and patients a checkpoint's features would (paper Table 1, note 1)."""
    ids, x = read_embeddings(path)
    row = dict(zip(ids.tolist(), range(len(ids))))
    missing = [i for i in ds.ids if i not in row]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of the {len(ds)} ids of {ds.name} {ds.split} are missing, "
                         f"e.g. {missing[0]!r} (ids are our cache's record ids)")
    return {"x": x[[row[i] for i in ds.ids]], "y": np.asarray(ds.labels, np.float32),
            "ids": np.array(ds.ids, dtype=str)}


# ---------------------------------------------------------------- embed: one's own images and volumes

FILE_KINDS = {".png": "xray", ".jpg": "xray", ".jpeg": "xray", ".nii": "nifti", ".nii.gz": "nifti"}


class ImageFiles(torch.utils.data.Dataset):
    """Radiographs (PNG/JPG, DICOM) and CT volumes (NIfTI, DICOM series) as Records, decoded and preprocessed
    by data.load_source, the function `python data.py prepare` uses, at the long sides given (paper 2.4)."""

    def __init__(self, sources: list, size_2d: int, size_3d: int, patch: int):
        self.sources, self.name, self.split = sources, "files", ""
        self.ids = [s.id for s in sources]
        self.options = {kind: readers.Options(size=size or 0, min_side=patch)
                        for kind, size in (("xray", size_2d), ("nifti", size_3d), ("dicom-xray", size_2d),
                                           ("dicom-ct", size_3d))}

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        """The Record of input i, or Unreadable: one bad file among many is skipped and named, not the end of the
        job (whole_views decides), also when worker processes read it."""
        src = self.sources[i]
        try:
            image = data.load_source(src, self.options[src.kind])
        except Exception as e:  # any decoder's error on a user's file: one line that names the file
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            return Unreadable(src.path, message.removeprefix(f"{src.path}: "))
        return data.Record(image, src.labels, "2d" if src.kind in ("xray", "dicom-xray") else "3d", src.id)


def file_source(path: str) -> readers.Source:
    """One image or volume named on the command line. A PNG/JPG or NIfTI file's id is the path as given, without
    the extension; a DICOM file (any name) is read as in a folder of DICOM files (dicom_file_source)."""
    ext = next((e for e in sorted(FILE_KINDS, key=len, reverse=True) if path.lower().endswith(e)), None)
    if ext is None:
        if path.lower().endswith(".dcm") or is_dicom(path):
            return dicom_file_source(path)
        raise ValueError(f"{path}: not a PNG/JPG image, a NIfTI volume (.nii, .nii.gz) or a DICOM file")
    rid = path[: -len(ext)]
    return readers.Source(rid, rid, "", np.full(len(data.LABELS), np.nan, np.float32), path, FILE_KINDS[ext])


def is_dicom(path: str) -> bool:
    """A file of any name that starts as DICOM files do (the 'DICM' prefix scan_dicom's reader needs)."""
    if importlib.util.find_spec("pydicom") is None:
        return False
    from pydicom.misc import is_dicom as has_dicom_prefix
    return has_dicom_prefix(path)


def dicom_file_source(path: str) -> readers.Source:
    """A single DICOM file: a CR/DX radiograph, or a CT series of that one file, found by readers.scan_dicom in
    the file's folder (the series a file belongs to is known only from its neighbours), with the id `data.py
    prepare --dataset dicom` gives it. One slice of a longer series is an error that names the folder to give."""
    file = Path(path).resolve()
    try:
        found = readers.scan_dicom(file.parent, readers.Options(dicom_modality="any"))
    except ImportError as e:  # no pydicom: one line, as for every other input
        raise ValueError(f"{path}: {e}") from None
    for src in found:
        if src.kind == "dicom-xray" and Path(src.path).resolve() == file:
            return replace(src, path=path)
        if src.kind == "dicom-ct" and file in [Path(f).resolve() for f in src.files]:
            if len(src.files) > 1:
                raise ValueError(f"{path}: one slice of a CT series of {len(src.files)} files: give its folder "
                                 f"({file.parent}) to embed the volume")
            return replace(src, path=path)
    raise ValueError(f"{path}: no CR/DX/DR radiograph or CT image in this file (not DICOM, or no image in it)")


def embed_inputs(inputs: list, args, patch: int) -> list:
    """INPUT arguments -> [(input, dataset)]: phantom names and caches by split, loose files and folders in one
    ImageFiles per run of consecutive ones."""
    out, files = [], []
    for spec in inputs:
        phantom = spec in data.PHANTOMS or spec in data.PAIRED_PHANTOMS  # the paired ones are radiographs
        if phantom or os.path.isfile(os.path.join(spec, "index.json")):
            splits = [args.split] if args.split else data.list_splits(spec)
            options = {}
            if phantom:  # the probe's phantoms: same ids, labels and images
                size = args.size_3d if spec in data.PHANTOMS and "3d" in spec else args.size_2d
                options = {k: v for k, v in (("n", args.n), ("size", size), ("seed", args.seed)) if v is not None}
            if files:
                out.append(("files", ImageFiles(files, args.size_2d, args.size_3d, patch)))
                files = []
            out += [(f"{spec}:{s}", data.open_dataset(spec, s, **options)) for s in splits]
        elif os.path.isdir(spec):
            found = readers.scan_folder(Path(spec), "2d") + readers.scan_folder(Path(spec), "3d") or dicom_sources(spec)
            if not found:
                raise FileNotFoundError(f"{spec}: no PNG/JPG images, NIfTI volumes or DICOM series in this folder")
            files += sorted(found, key=lambda s: s.id)
        elif os.path.isfile(spec):
            files.append(file_source(spec))
        else:
            raise FileNotFoundError(f"{spec}: not found (an image, a NIfTI volume, a DICOM file, a folder of them, "
                                    f"a cache from `python data.py prepare` or a phantom name {data.PHANTOMS})")
    if files:
        out.append(("files", ImageFiles(files, args.size_2d, args.size_3d, patch)))
    return out


def dicom_sources(folder: str) -> list:
    """CT series and CR/DX/DR radiographs under a folder of DICOM files (pydicom needed, as for data.py); one
    with a known problem (no regular volume, another modality) is skipped and named when read, as any bad input."""
    if importlib.util.find_spec("pydicom") is None:
        return []
    return readers.scan_dicom(Path(folder), readers.Options(dicom_modality="any"))


def skipped_names(skipped: list, shown: int = 5) -> str:
    names = [s.path for s in skipped]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def embed(args) -> dict:
    """`probe.py embed`: the checkpoint's frozen embeddings of every input, in the file format --features reads.

    An input that cannot be read is skipped and named (one line each, then how many of all), the rest written;
    a run of one input, or one in which no input could be read, is an error."""
    model, ckpt = backbone_from_checkpoint(args.ckpt, "cpu", attn=args.attn)
    train_sizes(args, ckpt.get("args") or {})  # preprocess at the sizes the model was trained on
    inputs = embed_inputs(args.inputs, args, model.patch)
    seen = {}  # id -> the input it comes from
    for name, ds in inputs:  # before any work: every id once, or --features could not key the rows
        sources = [s.path for s in ds.sources] if isinstance(ds, ImageFiles) else [name] * len(ds)
        for rid, source in zip(ds.ids, sources):
            if rid in seen:
                raise ValueError(f"{args.out}: id {rid!r} comes from {seen[rid]} and {source}: embed them into "
                                 "separate files")
            seen[rid] = source
    model.to(args.device)
    skipped = [] if len(seen) > 1 else None  # one input: its problem is the error itself
    feats = stack([extract_features(model, ds, args.batch_tokens, args.workers, skipped) for _, ds in inputs])
    if skipped and len(skipped) == len(seen):
        raise ValueError(f"none of the {len(seen)} inputs could be read (each is named above): "
                         f"{skipped_names(skipped)}")
    if skipped:
        print(f"skipped {len(skipped)} of {len(seen)} inputs: {skipped_names(skipped)}", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_embeddings(args.out, feats, source=np.array([seen[i] for i in feats["ids"]], dtype=str))
    print(f"wrote {len(feats['ids'])} embeddings ({feats['x'].shape[1]}-d) to {args.out}")
    return feats


def embed_args(argv):
    p = argparse.ArgumentParser(
        prog="probe.py embed",
        description="Frozen embeddings of your own radiographs and CT volumes, preprocessed as `python data.py "
                    "prepare` does at the checkpoint's sizes, written as FILE.npz (ids, x, y, source) in the "
                    "format `probe.py --features` reads.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="PNG/JPG radiographs, NIfTI volumes (.nii, .nii.gz), DICOM radiographs (CR/DX; .dcm or "
                        "any name), folders of PNG/JPG/NIfTI files or of DICOM files and series (searched "
                        "recursively; each CT series is one volume, read as `data.py prepare --dataset dicom` does; "
                        "DICOM needs pydicom), caches from `python data.py prepare`, or phantom names. An input "
                        "that cannot be read is skipped and named, the rest written")
    p.add_argument("--ckpt", required=True, help="checkpoint of train.py")
    p.add_argument("--out", required=True, help="embeddings file to write (.npz)")
    p.add_argument("--split", default=None, help="caches and phantoms: this split only (default: all of them)")
    p.add_argument("--size-2d", type=int, default=None,
                   help="long side of radiographs (default: the checkpoint's training size, else 224, paper 2.4)")
    p.add_argument("--size-3d", type=int, default=None,
                   help="long side of CT volumes (default: the checkpoint's training size, else 112, paper 2.4)")
    p.add_argument("--n", type=int, default=None, help=f"phantoms: samples per split (default: {data.PHANTOM_N['train']} train and "
                                                        f"{data.PHANTOM_N['test']} test)")
    p.add_argument("--seed", type=int, default=0, help="phantoms: seed (as probe.py --seed; default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=32768, help="tokens per packed batch (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes reading and preprocessing the inputs (default: %(default)s)")
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "varlen", "flash", "flex"),
                   help="attention backend (default: %(default)s)")
    return p.parse_args(argv)
