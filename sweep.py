"""The recipe sweep: the CPU demo's recipe varied one factor at a time, every run scored on validation phantoms.

    python sweep.py --dry-run              # the runs and which are done
    python sweep.py                        # run what is not finished, then write results/recipe/
    python sweep.py --only base lr-5e-4    # some runs only
    python sweep.py --summarize            # only rewrite results/recipe/ from what has finished

Where the paper is silent (projector, augmentations, input scaling) the default must be what measured best, and
that choice must not read the test sets. So each run, RUNS/<name>/, is
    train.py --stage 3 --seed 0 <its flags> --resume auto        (the CPU demo on phantoms)
and is scored on phantoms of another seed, VAL_SEED, that no grid uses:
    probe.py --ckpt last.pt --random-init --seed VAL_SEED --lp ALL   (LP ALL trained on VAL_SEED's train split,
                                                                     scored on its test splits: validation)
    reproduce.health on VAL_SEED's test phantoms                 (ranks beside a Gaussian batch's; SIGReg at end)
plus the online probe's AUROC at the end of training. The table, results/recipe/table.md, has every run,
failures included; results/recipe/README.md says what each factor did. Resumable: a finished run and its
scores are not redone; a killed run continues from its checkpoint.
"""
import argparse
import json
import os
import shlex
import sys
import time

import numpy as np

import data
import figures
import reproduce

VAL_SEED = 100  # validation phantoms: the grid's seeds are 0, 1, 2
# name -> train.py flags beside the defaults (the CPU demo: tiny, depth 6, 24 + 8 samples, lr 1e-4, LayerNorm
# projector 2048-2048-128, multi-crop only). One factor at a time from "base", then combinations.
RUNS = {
    "base": "--steps 300",
    "lr-5e-4": "--steps 300 --lr 5e-4",
    "lr-2e-3": "--steps 300 --lr 2e-3 --warmup 30",
    "proj-batch": "--steps 300 --proj-norm batch",
    "proj-k16": "--steps 300 --proj-out 16",
    "proj-batch-k16": "--steps 300 --proj-norm batch --proj-out 16",
    "photometric": "--steps 300 --photometric",
    "gamma-0.5": "--steps 300 --gamma 0.5",
    "standardize": "--steps 300 --standardize",
    "proj-batch-k16-photometric": "--steps 300 --proj-norm batch --proj-out 16 --photometric",
    "proj-batch-k16-gamma-0.5": "--steps 300 --proj-norm batch --proj-out 16 --gamma 0.5",
    "batch-x2": "--steps 300 --batch-2d 48 --batch-3d 16",
    "drop-path-0.1": "--steps 300 --drop-path 0.1",
    "slices-1024": "--steps 300 --slices 1024",
    "centroid-all": "--steps 300 --centroid all",
    "proj-batch-k16-lr-5e-4": "--steps 300 --proj-norm batch --proj-out 16 --lr 5e-4",
    "proj-batch-k16-lr-2e-3": "--steps 300 --proj-norm batch --proj-out 16 --lr 2e-3 --warmup 30",
}
SETS = tuple(reproduce.TEST_SETS.items())  # (key, the paper's test set that a phantom set stands for)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(RUNS), default=None, help="these runs only (default: all)")
    p.add_argument("--runs", default="runs/recipe", help="folder of the runs (default: %(default)s)")
    p.add_argument("--out", default="results/recipe", help="where the table goes (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and which are done, run nothing")
    p.add_argument("--summarize", action="store_true", help="only rewrite --out from what has finished")
    return p.parse_args(argv)


def steps_of(flags: str) -> int:
    argv = shlex.split(flags)
    return int(argv[argv.index("--steps") + 1])


def commands(name: str, folder: str) -> dict:
    """{kind: argv} of a run: its training and its validation probe."""
    train = ["train.py", "--stage", "3", "--seed", "0", *shlex.split(RUNS[name]), "--ckpt-every", "100",
             "--out", folder, "--resume", "auto"]
    probe = ["probe.py", "--ckpt", f"{name}={os.path.join(folder, 'last.pt')}", "--random-init", "--seed",
             str(VAL_SEED), "--lp", "ALL", "--bootstrap", "200", "--maps", "0", "--out", os.path.join(folder, "val")]
    return {"train": train, "probe": probe}


def newer(path: str, than: str) -> bool:
    return os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(than)


def is_done(name: str, folder: str, kind: str) -> bool:
    ckpt = os.path.join(folder, "last.pt")
    if reproduce.trained_step(folder) < steps_of(RUNS[name]):
        return False
    if kind == "train":
        return True
    return newer(os.path.join(folder, "val", "table1.json"), ckpt) and newer(os.path.join(folder, "health.json"), ckpt)


def run_one(name: str, folder: str):
    os.makedirs(folder, exist_ok=True)
    for kind, argv in commands(name, folder).items():
        if is_done(name, folder, kind):
            continue
        print(f"=== {name}: python {' '.join(argv)}", flush=True)
        start = time.time()
        with open(os.path.join(folder, f"{kind}.log"), "a") as log:
            rc, sig = reproduce.run_job(argv, log)
        if sig is not None:
            raise SystemExit(f"sweep.py: {name} stopped by a signal (exit {rc}); run the same command to continue")
        if rc != 0:
            print(f"sweep.py: {name}: {kind} failed (exit {rc}); see {folder}/{kind}.log", file=sys.stderr)
            return
        if kind == "probe":  # the health figures read the same validation phantoms
            h = reproduce.health({name: os.path.join(folder, "last.pt")}, VAL_SEED)
            data.atomic_write(os.path.join(folder, "health.json"), lambda f: f.write(json.dumps(h, indent=1).encode()))
        print(f"    {kind} finished in {(time.time() - start) / 60:.1f} min", flush=True)


def scores(name: str, folder: str) -> dict:
    """A finished run's numbers: LP ALL validation macro AUROC per set (and the random init's), health, online probe."""
    ms = reproduce.macro(os.path.join(folder, "val"))
    metrics = figures.read_metrics(os.path.join(folder, "metrics.jsonl"))
    online = [r["probe_auroc"] for r in metrics if r.get("probe_auroc") is not None]
    health = json.load(open(os.path.join(folder, "health.json")))
    times = [r["step_time_s"] for r in metrics if "step_time_s" in r]
    out = {"flags": RUNS[name], "steps": steps_of(RUNS[name]), "health": health.get(name, {}),
           "random_health": health.get(reproduce.RANDOM, {}), "online_probe_end": online[-1] if online else None,
           "online_probe_curve": [(r["step"], r["probe_auroc"]) for r in metrics if r.get("probe_auroc") is not None],
           "step_time_s": float(np.median(times)) if times else None}
    for key, title in SETS:
        for row, field in ((name, "val"), (reproduce.RANDOM, "random")):
            v = ms.get((row, "ALL", key))
            out.setdefault(field, {})[key] = None if v is None else {"macro": v[0], "ci": list(v[1])}
    gains = [out["val"][k]["macro"] - out["random"][k]["macro"] for k, _ in SETS if out["val"][k] and out["random"][k]]
    out["mean_gain"] = float(np.mean(gains)) if len(gains) == len(SETS) else None
    out["min_gain"] = float(np.min(gains)) if len(gains) == len(SETS) else None
    return out


def summarize(args) -> dict:
    rows = {}
    for name in RUNS:
        folder = os.path.join(args.runs, name)
        if is_done(name, folder, "probe"):
            rows[name] = scores(name, folder)
        elif os.path.exists(folder):
            rows[name] = {"flags": RUNS[name], "steps": steps_of(RUNS[name]), "state": "not finished: " + (
                f"trained to step {reproduce.trained_step(folder)}" if reproduce.trained_step(folder) < steps_of(
                    RUNS[name]) else "not scored")}
    if not rows:
        return {}
    g = lambda r, k, d=2: "-" if r.get(k) is None else f"{r[k]:.{d}f}"  # noqa: E731
    lines = [f"# The recipe sweep (validation phantoms, seed {VAL_SEED})", "",
             f"Written by `python sweep.py --summarize`. Every run: `python train.py --stage 3 --seed 0 FLAGS` (the "
             "CPU demo on phantoms), scored on validation phantoms of seed "
             f"{VAL_SEED}: LP ALL macro AUROC (probe.py's defaults, 256 test samples per set: CIs about +-0.03) "
             "beside the random initialisation's; the embedding health on 256 validation phantoms per modality; "
             "SIGReg's last logged value beside an isotropic Gaussian batch's of the same size and K; the "
             "projector's effective rank within 24 radiographs beside 24 Gaussian samples' in K dimensions.", "",
             "| run | flags | SIGReg end (Gaussian) | rank 2D / 3D (backbone) | projector rank, 24 radiographs "
             "(Gaussian) | online probe at end | " + " | ".join(f"LP ALL {t}" for _, t in SETS) +
             " | gain over random: mean / min | s/step |",
             "| --- | --- | --- | --- | --- | --- |" + " --- |" * len(SETS) + " --- | --- |"]
    random = None
    for name, r in rows.items():
        if "state" in r:
            lines.append(f"| {name} | `{r['flags']}` | {r['state']} |" + " |" * (7 + len(SETS)))
            continue
        random = random or r["random"]
        h = r["health"]
        lines.append(
            f"| {name} | `{r['flags']}` | {g(h, 'sigreg_end')} ({g(h, 'sigreg_gaussian')}) | "
            f"{g(h, 'rank_2d')} / {g(h, 'rank_3d')} | {g(h, 'proj_rank_2d_24')} ({g(h, 'proj_rank_gaussian_24', 1)}) | "
            f"{g(r, 'online_probe_end', 3)} | " + " | ".join(g(r["val"][k] or {}, "macro", 3) for k, _ in SETS) +
            f" | {r['mean_gain']:+.3f} / {r['min_gain']:+.3f} | {g(r, 'step_time_s')} |")
    if random:
        lines.append("| random init | - | - | - | - | - | " + " | ".join(g(random[k] or {}, "macro", 3) for k, _ in SETS)
                     + " | - | - |")
    os.makedirs(args.out, exist_ok=True)
    text = "\n".join(lines) + "\n"
    data.atomic_write(os.path.join(args.out, "table.md"), lambda f: f.write(text.encode()))
    data.atomic_write(os.path.join(args.out, "runs.json"), lambda f: f.write(json.dumps(rows, indent=1).encode()))
    return rows


def main(argv=None) -> int:
    args = get_args(argv)
    names = args.only or list(RUNS)
    if args.dry_run or not args.summarize:
        for name in names:
            folder = os.path.join(args.runs, name)
            state = "done" if is_done(name, folder, "probe") else f"step {reproduce.trained_step(folder)}"
            print(f"  {name:<28} {state:>10}  python {' '.join(commands(name, folder)['train'])}")
    if args.dry_run:
        return 0
    if not args.summarize:
        for name in names:
            run_one(name, os.path.join(args.runs, name))
            summarize(args)
    print("wrote", os.path.join(args.out, "table.md")) if summarize(args) else print("sweep.py: nothing finished yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
