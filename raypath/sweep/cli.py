"""``raypath sweep``: the command-line face of :func:`raypath.sweep.api.run_sweep`."""

from __future__ import annotations

import argparse

from raypath.config import add_config_arguments, config_from_args


def exit_code(trials) -> int:
    """0 when at least one trial finished every fold; otherwise 1, after printing
    the failures by cause and the first failure's reason (a chained step has no
    best config to use)."""
    import sys
    from collections import Counter

    from raypath.errors import EXIT_BUG, EXIT_OK

    failed = trials[trials["status"] == "error"] if len(trials) else trials
    if len(failed):
        causes = Counter(str(e).split(":", 1)[0].strip() or "unknown" for e in failed["error"])
        print("failed trials by cause: " + ", ".join(f"{c} x{n}" for c, n in causes.most_common()), file=sys.stderr)
    if len(trials) and (trials["status"] == "complete").any():
        return EXIT_OK
    if len(failed):
        first = failed.iloc[0]
        print(f"sweep: no trial completed; first failure (trial {first['trial_id']}): {first['error']}", file=sys.stderr)
    else:
        print("sweep: no trial completed (stopped early or none run)", file=sys.stderr)
    return EXIT_BUG


def add_cli(sub: argparse._SubParsersAction) -> None:
    from raypath.sweep.api import SweepConfig

    p = sub.add_parser(
        "sweep",
        help="Ray Tune + Optuna search over adapter/MIL settings with a nested leave-one-dataset-out objective",
        description=(
            "Runs trials of the search space in --space (see sweeps/examples/ and docs/sweep.md); each trial "
            "runs every LODO fold (adapt on the training cohorts -> embed -> MIL -> score the held-out cohort). "
            "Writes <workdir>/sweeps/<name>/: trials.parquet/csv, best_config.yaml, sweep.json, PNG plots. "
            "After an interruption, re-run with --resume to finish the remaining trials."
        ),
    )
    add_config_arguments(p, SweepConfig)

    def run(args: argparse.Namespace) -> int:
        from raypath.sweep.api import run_sweep

        cfg = config_from_args(SweepConfig, args)
        res = run_sweep(cfg)
        t = res.trials
        n_err = int((t["status"] == "error").sum()) if len(t) else 0
        print(f"sweep: {res.sweep_dir}")
        print(f"trials: {len(t)} ({int((t['status'] == 'complete').sum()) if len(t) else 0} complete, "
              f"{n_err} failed) over {res.n_folds} LODO folds")
        if res.best:
            objs = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.best["objectives"].items())
            print(f"best trial {res.best['trial_id']}: {objs}")
            print("reproduce with:")
            for c in res.best["commands"]:
                print(f"  {c}")
        else:
            print("no trial finished every fold")
        return exit_code(t)

    p.set_defaults(func=run)
