"""Toy-scale identity evidence for LiDB + hypernetwork + rank-relaxed finetuning (see docs/evidence.md).

    .venv/bin/python bench/bench_evidence.py            # full run
    .venv/bin/python bench/bench_evidence.py --quick    # the CI variant
    .venv/bin/python bench/bench_evidence.py --scaled   # 1,000 training identities, 2,000 stage-1 steps

Builds a world with known identities, fits an identity recognizer on its
training identities, checks the gate (teacher beats base on identity; exit 2 if
not), runs `hdb` stage 0 and stage 1, personalises held-out identities from one
photo each and prints the identity table with paired bootstrap CIs; writes the
plots and a JSON of all numbers to --out (`--replot` redraws the plots of an earlier run,
`--summary` puts finished runs side by side).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import replace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


RESULT_KEYS = ("arms", "refs", "cis", "lrs", "val_cos", "gate", "world_stats", "timings", "test", "validation")


def main(argv=None) -> int:
    import torch

    from bench.evidence import report
    from bench.evidence.run import Settings, quick, run, scaled

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small world and short training (CI)")
    p.add_argument("--scaled", action="store_true",
                   help="820 more training identities (photos only) and 2,000 stage-1 steps (about an hour)")
    p.add_argument("--grid-extensions", type=int, default=None,
                   help="rounds that grow an arm's learning-rate grid past an edge where its best validation rate "
                        "sits (default 2, the quick run 0; 0 saves about 4 min of the full run)")
    p.add_argument("--prior-weight", type=float, default=None,
                   help="the weight of every finetune's prior term for \"a face\" (default 0: off; "
                        "docs/evidence.md \"The prior term\")")
    p.add_argument("--stage-prior-weight", type=float, default=None,
                   help="the same prior term in stage 0 and stage 1 (default: `hdb`'s, 1; 0: off, as in the runs "
                        "before it became the default; docs/evidence.md \"The prior term in stages 0 and 1\")")
    p.add_argument("--out", default=None, help="output folder (default bench/out/evidence[-quick|-scaled])")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest for these tiny models on a busy machine)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for the per-identity evaluation (default: 2 where there are 2 cores); "
                        "the numbers do not depend on it")
    p.add_argument("--replot", metavar="FOLDER", default=None,
                   help="only redraw the plots of an earlier run from FOLDER/results.json (nothing is trained)")
    p.add_argument("--summary", metavar="FOLDER", nargs="+", default=None,
                   help="only print finished runs side by side (their main arms and the goals' verdicts), from each "
                        "FOLDER/results.json, as README quotes them")
    args = p.parse_args(argv)
    if args.replot:
        return replot(args.replot, report)
    if args.summary:
        return summarise(args.summary, report)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("hdb").setLevel(logging.ERROR)
    if args.quick and args.scaled:
        p.error("--quick and --scaled are two different sizes; choose one.")
    settings = replace(quick() if args.quick else scaled() if args.scaled else Settings(), workers=args.workers)
    if args.prior_weight is not None:
        settings = replace(settings, prior_weight=args.prior_weight)
    if args.stage_prior_weight is not None:
        settings = replace(settings, stage_prior_weight=args.stage_prior_weight)
    if args.grid_extensions is not None:
        if args.grid_extensions < 0:
            p.error(f"--grid-extensions must be 0 or more, not {args.grid_extensions}.")
        settings = replace(settings, grid_extensions=args.grid_extensions)
    out = args.out or os.path.join(REPO, "bench", "out",
                                   "evidence-quick" if args.quick else "evidence-scaled" if args.scaled else "evidence")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    result = run(out, settings, log=lambda m: print(m, flush=True))
    total = time.time() - t0
    print()
    print(report.gate_text(result))
    t = result["timings"]
    if not result["gate"]["passed"]:
        print(f"\ntime: world {t['world']:.0f} s, gate {t['gate']:.0f} s, total {total:.0f} s")
        return 2
    print()
    print(report.table(result, settings))
    print()
    print(report.ci_text(result))
    print()
    print(report.goals_text(result))
    print("learning rates chosen on the validation identities " + ", ".join(result["validation"]) + ": "
          + ", ".join(f"{a} {lr:g}" for a, lr in result["lrs"].items()))
    pngs = draw_plots(result, out, report)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({k: result[k] for k in RESULT_KEYS}, f, indent=1)
    print(f"\ntime: world {t['world']:.0f} s, recognizer + gate {t['gate']:.0f} s, stage 0 {t['stage0']:.0f} s, "
          f"stage 1 {t['stage1']:.0f} s, evaluation {t['eval']:.0f} s, total {total:.0f} s; plots {', '.join(pngs)}")
    return 0


def draw_plots(result: dict, out: str, report) -> list[str]:
    """The run's three plots, written into `out`; their paths."""
    return [report.plot(result, os.path.join(out, "identity_vs_steps.png")),
            report.plot_tradeoff(result, os.path.join(out, "identity_vs_editability.png")),
            report.plot_drift(result, os.path.join(out, "identity_vs_drift.png"))]


def read_results(folder: str) -> dict | None:
    """A finished run's results.json, or None after saying which folder lacks one."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        print(f"No results.json in '{folder}': give the --out folder of a finished bench_evidence.py run.",
              file=sys.stderr)
        return None
    with open(path) as f:
        return json.load(f)


def replot(folder: str, report) -> int:
    """Redraw a finished run's plots from its results.json, so older runs get the newer plots; 2 if it has none."""
    result = read_results(folder)
    if result is None:
        return 2
    for png in draw_plots(result, folder, report):
        print(png)
    return 0


def summarise(folders: list[str], report) -> int:
    """Print finished runs side by side, each named by its folder; 2 if one has no results.json."""
    runs = {os.path.basename(os.path.normpath(f)): read_results(f) for f in folders}
    if any(r is None for r in runs.values()):
        return 2
    if len(runs) < len(folders):
        print("Two of the folders have the same name: give each run's folder a name of its own.", file=sys.stderr)
        return 2
    print(report.summary(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
