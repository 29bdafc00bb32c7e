"""`mtp-sweep EXPERIMENT.yaml [--emit slurm|gke] [--dry-run] [--report]`."""

from __future__ import annotations

from mtp_jax.errors import ArgParser, guarded


@guarded
def main(argv: list[str]) -> int:
    ap = ArgParser(prog="mtp-sweep", description="Run, emit or report a grid of training runs.")
    ap.add_argument("experiment", help="experiment file, e.g. experiments/induction/sweep.yaml")
    ap.add_argument("--emit", choices=("slurm", "gke"), help="write cluster jobs through launch/ instead of running here")
    ap.add_argument("--dry-run", action="store_true", help="print what would run or be submitted; train nothing")
    ap.add_argument("--report", action="store_true", help="collect every point's results into results.csv and plots")
    args = ap.parse_args(argv)
    from mtp_jax.sweep.experiment import load_experiment

    experiment = load_experiment(args.experiment)
    if args.report:
        from mtp_jax.sweep.report import report

        report(experiment)
        return 0
    if args.emit:
        from mtp_jax.sweep.emit import emit

        return emit(experiment, args.emit, args.dry_run)
    if args.dry_run:
        from mtp_jax.sweep.local import status, train_command

        for point in experiment.points:
            print(f"[{status(experiment, point)}] {' '.join([*train_command(), str(experiment.base), *point.args()])}")
        return 0
    from mtp_jax.sweep.local import run_local

    return 1 if run_local(experiment) else 0


if __name__ == "__main__":  # python -m mtp_jax.sweep.cli EXPERIMENT ...
    raise SystemExit(main())
