"""Console entry points. Every user error ends as one `error: ...` line and exit code 2 (`errors.guarded`);
Ctrl-C anywhere (start-up, compile, step, save) as one line and exit code 130 (`interrupts`)."""

from __future__ import annotations

import json
import sys

from mtp_jax.errors import ArgParser, UserError, guarded
from mtp_jax.interrupts import interruptible


@guarded
@interruptible
def train_main(argv: list[str]) -> int:
    ap = ArgParser(prog="mtp-train", description="Train an MTP model; resumes when RUN_DIR has a checkpoint.")
    ap.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=30 train.run_dir=runs/demo")
    args = ap.parse_args(argv)
    from mtp_jax.config import load_config
    from mtp_jax.interrupts import terminate_start_up

    terminate_start_up()  # importing JAX and starting up take seconds to minutes: SIGTERM there says so in one line
    cfg = load_config(args.config, args.overrides)  # before importing JAX: a config error is instant
    from mtp_jax.train import train

    result = train(cfg)
    return 0 if result else 1


@guarded
@interruptible
def eval_main(argv: list[str]) -> int:
    from mtp_jax.data import generated
    from mtp_jax.evals.code import cli as code

    ap = ArgParser(prog="mtp-eval", description="Held-out loss, perplexity, bits/byte and top-1 per head; a "
                   "synthetic task's metrics; or pass@k on a code benchmark.")
    ap.add_argument("run_dir")
    ap.add_argument("--task", default="heldout", choices=["heldout", *generated.SOURCES, *code.TASKS])
    ap.add_argument("--batches", type=int, default=0, help="evaluation batches (0 = train.eval_batches of the run)")
    code.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.task in code.TASKS:
        print(json.dumps(code.run_task(args)["metrics"]))
        return 0
    if args.batches < 0:
        raise UserError(f"--batches {args.batches} must be >= 0 (0 = train.eval_batches of the run)")
    if args.task in generated.SOURCES:
        from mtp_jax.evals.tasks import evaluate_run_task

        print(json.dumps(evaluate_run_task(args.run_dir, args.task)))
        return 0
    from mtp_jax.evals.cli import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir, args.batches or None)))
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
