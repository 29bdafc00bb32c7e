"""Console entry points. Every user error ends as one `error: ...` line and exit code 2 (`errors.guarded`)."""

from __future__ import annotations

import json
import sys

from mtp_jax.errors import ArgParser, guarded


@guarded
def train_main(argv: list[str]) -> int:
    ap = ArgParser(prog="mtp-train", description="Train an MTP model; resumes when RUN_DIR has a checkpoint.")
    ap.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=30 train.run_dir=runs/demo")
    args = ap.parse_args(argv)
    from mtp_jax.config import load_config
    from mtp_jax.train import train

    result = train(load_config(args.config, args.overrides))
    return 0 if result else 1


@guarded
def eval_main(argv: list[str]) -> int:
    ap = ArgParser(prog="mtp-eval", description="Held-out loss, perplexity, bits/byte, top-1 per head.")
    ap.add_argument("run_dir")
    ap.add_argument("--batches", type=int, default=0, help="evaluation batches (0 = train.eval_batches of the run)")
    ap.add_argument("--task", default="heldout", help="heldout (default), induction or polynomial")
    args = ap.parse_args(argv)
    from mtp_jax.evals.cli import evaluate_run, run_task

    result = run_task(args.run_dir, args.task) if args.task != "heldout" else evaluate_run(args.run_dir, args.batches or None)
    print(json.dumps(result))
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    from mtp_jax.decode.cli import main

    return main(argv)


COMMANDS = {"train": train_main, "eval": eval_main, "generate": generate_main}

if __name__ == "__main__":  # python -m mtp_jax.cli {train,eval,generate} ...
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m mtp_jax.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(COMMANDS[sys.argv[1]](sys.argv[2:]))
