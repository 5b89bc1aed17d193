"""The recipe sweep: the CPU demo's recipe varied one factor at a time, every run scored on validation phantoms.

    python sweep.py --dry-run              # the runs and which are done
    python sweep.py                        # run what is not finished, then write results/recipe/
    python sweep.py --only base lr-5e-4    # some runs only
    python sweep.py --summarize            # only rewrite results/recipe/ from what has finished
    python sweep.py --scaling              # the chosen recipe's gain against training length -> results/scaling/

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

--scaling (the gain against training length, which the paper leaves to future work): one run per row, S3 and
Supervised, of SCALING_STEPS[-1] steps with the chosen recipe (CHOSEN), its checkpoints kept at every step of
SCALING_STEPS, all probed once on the test sets (seed 0) beside the random initialisation: results/scaling/.
"""
import argparse
import json
import os
import shlex
import shutil
import sys
import time

import numpy as np

import data
import figures
import reproduce

VAL_SEED = 100  # validation phantoms: the grid's seeds are 0, 1, 2
# name -> train.py flags beside the defaults (the CPU demo: tiny, depth 6, 24 + 8 samples, lr 1e-4, projector
# 2048-2048-128, multi-crop only). One factor at a time from "base", then combinations.
RUNS = {  # --proj-norm layer: the projector before the sweep made BatchNorm the default
    "base": "--steps 300 --proj-norm layer",
    "lr-5e-4": "--steps 300 --proj-norm layer --lr 5e-4",
    "lr-2e-3": "--steps 300 --proj-norm layer --lr 2e-3 --warmup 30",
    "proj-batch": "--steps 300 --proj-norm batch",
    "proj-k16": "--steps 300 --proj-norm layer --proj-out 16",
    "proj-batch-k16": "--steps 300 --proj-norm batch --proj-out 16",
    "photometric": "--steps 300 --proj-norm layer --photometric",
    "gamma-0.5": "--steps 300 --proj-norm layer --gamma 0.5",
    "standardize": "--steps 300 --proj-norm layer --standardize",
    "proj-batch-photometric": "--steps 300 --proj-norm batch --photometric",
    "local-grid-4": "--steps 300 --proj-norm layer --local-grid 4",
    "proj-batch-lr-5e-4": "--steps 300 --proj-norm batch --lr 5e-4",
    "drop-path-0.1": "--steps 300 --proj-norm layer --drop-path 0.1",
    "slices-1024": "--steps 300 --proj-norm layer --slices 1024",
    "centroid-all": "--steps 300 --proj-norm layer --centroid all",
    "batch-x2": "--steps 300 --proj-norm layer --batch-2d 48 --batch-3d 16",
    "proj-batch-k16-photometric": "--steps 300 --proj-norm batch --proj-out 16 --photometric",
    # The 3D side (results/nuisance): the adopted recipe at 1000 steps ("default-1000") against one factor each,
    # the apparent size per view (--zoom) and the 3D share of the batch; then the paper's 112-voxel volumes
    "default-1000": "--steps 1000",
    "zoom-1.25-1000": "--steps 1000 --zoom 1.25",
    "3d-half-1000": "--steps 1000 --batch-2d 16 --batch-3d 16",  # 3D samples: a quarter of the batch -> a half
    "size-3d-112": "--steps 300 --size-3d 112",  # the paper's volumes: against proj-batch (the same recipe at 56)
    "3d-half-small-1000": "--steps 1000 --batch-2d 8 --batch-3d 8",  # the 3D share of 3d-half with default's 3D count
    "3d-half-small-1000-seed1": "--steps 1000 --batch-2d 8 --batch-3d 8 --seed 1",  # it and the default, seed 1
    "default-1000-seed1": "--steps 1000 --seed 1",
    # The mechanism of the 3D share: SIGReg on each modality apart at the paper's 24 + 8 (results/nuisance)
    "sigreg-modality-1000": "--steps 1000 --sigreg-per modality",
    "sigreg-modality-1000-seed1": "--steps 1000 --sigreg-per modality --seed 1",
    "3d-half-sigreg-modality-1000": "--steps 1000 --batch-2d 16 --batch-3d 16 --sigreg-per modality",  # both
    # The health goals (SIGReg, projector rank): the balance of the two terms, against proj-batch (lambda 0.17)
    "lambd-0.34": "--steps 300 --lambd 0.34",
    "lambd-0.5": "--steps 300 --lambd 0.5",
    "slices-1024-1000": "--steps 1000 --slices 1024",  # slices-1024's gain at 300 steps, on the adopted recipe
    "proj-hidden-512": "--steps 300 --proj-hidden 512",  # the projector's width, against proj-batch (2048)
}
CHOSEN = "proj-batch"  # the recipe the scaling curve and the grid use: the sweep's best on validation (its README)
SCALING_STEPS = (250, 500, 1000, 2000, 4000)  # checkpoints of one run of SCALING_STEPS[-1] steps
SETS = tuple(reproduce.TEST_SETS.items())  # (key, the paper's test set that a phantom set stands for)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(RUNS), default=None, help="these runs only (default: all)")
    p.add_argument("--runs", default="runs/recipe", help="folder of the runs (default: %(default)s)")
    p.add_argument("--out", default="results/recipe", help="where the table goes (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and which are done, run nothing")
    p.add_argument("--summarize", action="store_true", help="only rewrite --out from what has finished")
    p.add_argument("--scaling", action="store_true", help=f"the gain against training length: {CHOSEN!r}'s recipe, "
                   f"S3 and Supervised, checkpoints at {SCALING_STEPS}, probed on the test sets -> results/scaling/")
    p.add_argument("--scaling-steps", type=int, nargs="+", default=list(SCALING_STEPS), help="the checkpoints kept "
                   "(default: %(default)s); the run is as long as the last")
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
        else:
            step = reproduce.trained_step(folder)
            rows[name] = {"flags": RUNS[name], "steps": steps_of(RUNS[name]), "state": "not run" if not step else
                          f"not finished: trained to step {step}" if step < steps_of(RUNS[name]) else "not scored"}
    g = lambda r, k, spec=".2f": "-" if r.get(k) is None else format(r[k], spec)  # noqa: E731
    lines = [f"# The recipe sweep (validation phantoms, seed {VAL_SEED})", "",
             f"Written by `python sweep.py --summarize`. Every run: `python train.py --stage 3 --seed 0 FLAGS` (the "
             "CPU demo on phantoms), scored on validation phantoms of seed "
             f"{VAL_SEED}: LP ALL macro AUROC (probe.py's defaults, 256 test samples per set: CIs about +-0.03) "
             "beside the random initialisation's; the embedding health on 256 validation phantoms per modality; "
             "SIGReg's last logged value beside an isotropic Gaussian batch's of the same size and K; the "
             "projector's effective rank within 24 radiographs beside 24 Gaussian samples' in K dimensions.", "",
             "| run | flags | SIGReg end (Gaussian) | rank 2D / 3D (backbone) | projector rank, 24 radiographs "
             "(Gaussian) | online probe at end | " + " | ".join(f"LP ALL {t}" for _, t in SETS) +
             " | gain over its random init: mean / min | random init, mean of 4 | s/step |",
             "| --- | --- | --- | --- | --- | --- |" + " --- |" * len(SETS) + " --- | --- | --- |"]
    random = None
    for name, r in rows.items():
        if "state" in r:
            lines.append(f"| {name} | `{r['flags']}` | {r['state']} |" + " |" * (8 + len(SETS)))
            continue
        random = random or r["random"]
        h = r["health"]
        lines.append(
            f"| {name} | `{r['flags']}` | {g(h, 'sigreg_end')} ({g(h, 'sigreg_gaussian')}) | "
            f"{g(h, 'rank_2d')} / {g(h, 'rank_3d')} | {g(h, 'proj_rank_2d_24')} ({g(h, 'proj_rank_gaussian_24', '.1f')}) | "
            f"{g(r, 'online_probe_end', '.3f')} | " + " | ".join(g(r["val"][k] or {}, "macro", ".3f") for k, _ in SETS) +
            f" | {g(r, 'mean_gain', '+.3f')} / {g(r, 'min_gain', '+.3f')} | "
            f"{np.mean([r['random'][k]['macro'] for k, _ in SETS]):.3f} | {g(r, 'step_time_s')} |")
    if random:
        lines.append("| random init (base's architecture) | - | - | - | - | - | " +
                     " | ".join(g(random[k] or {}, "macro", ".3f") for k, _ in SETS) + " | - | - | - |")
    os.makedirs(args.out, exist_ok=True)
    text = "\n".join(lines) + "\n"
    data.atomic_write(os.path.join(args.out, "table.md"), lambda f: f.write(text.encode()))
    data.atomic_write(os.path.join(args.out, "runs.json"), lambda f: f.write(json.dumps(rows, indent=1).encode()))
    return rows


# ---------------------------------------------------------------- the gain against training length

def scaling(args) -> dict:
    """S3 and Supervised with CHOSEN's flags, one run each to the last of args.scaling_steps (a checkpoint kept at
    each), probed once on the test sets with the random init; writes results/scaling/ (table.md, scaling.json,
    scaling.png)."""
    steps, root, out = args.scaling_steps, os.path.join(args.runs, "scaling"), "results/scaling"
    flags = shlex.split(RUNS[CHOSEN])
    del flags[flags.index("--steps"):flags.index("--steps") + 2]  # the scaling run sets its own length
    rows = {"S3": [], "Supervised": ["--objective", "supervised"]}
    ckpts = []
    for row, extra in rows.items():
        folder = os.path.join(root, row.lower())
        for s in steps:  # one schedule of steps[-1] steps, stopped and resumed at each kept step (exact: tested)
            kept = os.path.join(folder, f"step{s}.pt")
            if not os.path.exists(kept):
                argv = ["train.py", "--stage", "3", "--seed", "0", *flags, *extra, "--steps", str(steps[-1]),
                        "--stop-at", str(s), "--ckpt-every", "250", "--out", folder, "--resume", "auto"]
                print(f"=== {row} to step {s}: python {' '.join(argv)}", flush=True)
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "train.log"), "a") as log:
                    rc, sig = reproduce.run_job(argv, log)
                if rc != 0 or reproduce.trained_step(folder) != s:
                    raise SystemExit(f"sweep.py: {row} stopped at step {reproduce.trained_step(folder)} (exit {rc}); "
                                     f"see {folder}/train.log; run the same command to continue")
                shutil.copyfile(os.path.join(folder, "last.pt"), kept + ".tmp")
                os.replace(kept + ".tmp", kept)
            ckpts.append(f"{row}@{s}={kept}")
    probe_dir = os.path.join(root, "probe")
    if not all(newer(os.path.join(probe_dir, "table1.json"), c.split("=", 1)[1]) for c in ckpts):
        argv = ["probe.py", "--ckpt", *ckpts, "--random-init", "--seed", "0", "--n-test", "1024", "--lp", "ALL",
                "--maps", "0", "--out", probe_dir]
        print(f"=== probe: python {' '.join(argv)}", flush=True)
        with open(os.path.join(root, "probe.log"), "a") as log:
            rc, _ = reproduce.run_job(argv, log)
        if rc != 0:
            raise SystemExit(f"sweep.py: the probe failed (exit {rc}); see {root}/probe.log")
    ms = reproduce.macro(probe_dir)
    table = {row: {str(s): {k: ms[(f"{row}@{s}", "ALL", k)] for k, _ in SETS} for s in steps} for row in rows}
    random = {k: ms[(reproduce.RANDOM, "ALL", k)] for k, _ in SETS}
    lead = [s for s in steps if all(table["S3"][str(s)][k][0] - random[k][0] >= 0.05 for k, _ in SETS)]
    blob = {"recipe": CHOSEN, "flags": " ".join(flags), "steps": list(steps), "macro": table, "random_init": random,
            "s3_leads_by_0.05_everywhere_from": lead[0] if lead else None}
    lines = [f"# LP ALL against training length: recipe `{CHOSEN}` (`{' '.join(flags)}`), seed 0, test sets", "",
             "Written by `python sweep.py --scaling`: S3 and Supervised each one run of "
             f"{steps[-1]} steps (the cosine schedule of that length), probed at the checkpoints kept at "
             f"{', '.join(map(str, steps))}; macro AUROC (95% bootstrap CI), 1024 test phantoms per set.", "",
             "| row | step | " + " | ".join(t for _, t in SETS) + " |", "| --- | --- |" + " --- |" * len(SETS)]
    for row in rows:
        for s in steps:
            lines.append(f"| {row} | {s} | " + " | ".join(reproduce._ci(table[row][str(s)][k]) for k, _ in SETS) + " |")
    lines.append("| Random init | - | " + " | ".join(reproduce._ci(random[k]) for k, _ in SETS) + " |")
    lines += ["", "S3 leads its random initialisation by 0.05 or more on all four sets from step: "
              f"{blob['s3_leads_by_0.05_everywhere_from'] or f'none up to {steps[-1]}'}.", ""]
    os.makedirs(out, exist_ok=True)
    text = "\n".join(lines)
    data.atomic_write(os.path.join(out, "table.md"), lambda f: f.write(text.encode()))
    data.atomic_write(os.path.join(out, "scaling.json"), lambda f: f.write(json.dumps(blob, indent=1).encode()))
    plot_scaling(blob, os.path.join(out, "scaling.png"))
    return blob


def plot_scaling(blob: dict, path: str) -> bool:
    fig = figures.matplotlib_figure(figsize=(4.2 * len(SETS), 3.8), layout="constrained")
    if fig is None:
        return False
    for ax, (k, title) in zip(fig.subplots(1, len(SETS)), SETS):
        for i, (row, by_step) in enumerate(blob["macro"].items()):
            x = [int(s) for s in by_step]
            y, ci = np.array([by_step[s][k][0] for s in by_step]), np.array([by_step[s][k][1] for s in by_step])
            ax.plot(x, y, marker="o", color=f"C{i}", label=row)
            ax.fill_between(x, ci[:, 0], ci[:, 1], color=f"C{i}", alpha=0.15)
        r = blob["random_init"][k]
        ax.axhline(r[0], color="grey", ls="--", label="random init")
        ax.set(xscale="log", xlabel="training step", ylabel="LP ALL macro AUROC", title=title)
        ax.set_xticks(blob["steps"], [str(s) for s in blob["steps"]], minor=False)
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.suptitle(f"The gain against training length (recipe {blob['recipe']}, seed 0; 95% CIs shaded)")
    figures.save_figure(fig, path)
    return True


def main(argv=None) -> int:
    args = get_args(argv)
    if args.scaling:
        blob = scaling(args)
        print(f"wrote results/scaling/ (S3 leads by 0.05 everywhere from step {blob['s3_leads_by_0.05_everywhere_from']})")
        return 0
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
