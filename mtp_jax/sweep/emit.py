"""A sweep for a cluster, through the existing launch/ scripts (no new infrastructure).

- slurm: one array job, RESULTS_DIR/sweep.sbatch; task i runs `launch/slurm_gpu.sbatch BASE
  <point i's overrides>`, so each point gets the multi-node setup that script already does.
- gke: one JobSet manifest per point, rendered by `launch/gke/submit.sh` into RESULTS_DIR/gke/.

Points write into RESULTS_DIR/<point> (put results_dir on the cluster's shared filesystem), where
`mtp-sweep --report` collects them. `--dry-run` writes the files and prints the submit commands.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

from mtp_jax.errors import UserError
from mtp_jax.sweep.experiment import Experiment, Point
from mtp_jax.sweep.local import claim_results_dir

LAUNCH = Path("launch")


def _cluster(experiment: Experiment) -> dict:
    allowed = {"nodes", "time", "overrides", "kind"}
    unknown = set(experiment.cluster) - allowed
    if unknown:
        raise UserError(f"'cluster' in {experiment.path} has unknown keys {sorted(unknown)}; known: {', '.join(sorted(allowed))}")
    return {"nodes": 1, "time": "24:00:00", "overrides": {}, "kind": "gpu", **experiment.cluster}


def _args(experiment: Experiment, point: Point) -> list[str]:
    extra = _cluster(experiment)["overrides"]
    return [str(experiment.base), *point.args(), *(f"{k}={v}" for k, v in extra.items())]


def slurm_script(experiment: Experiment) -> str:
    """The array job: SLURM_ARRAY_TASK_ID picks a point's arguments for launch/slurm_gpu.sbatch."""
    cluster = _cluster(experiment)
    cases = "\n".join(f"  {p.index}) POINT=({' '.join(shlex.quote(a) for a in _args(experiment, p))}) ;;"
                      for p in experiment.points)
    return f"""#!/usr/bin/env bash
#SBATCH --job-name=mtp-sweep-{_slug(experiment.name)}
#SBATCH --array=0-{len(experiment.points) - 1}
#SBATCH --nodes={int(cluster["nodes"])}
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time={cluster["time"]}
#SBATCH --output={experiment.results_dir}/slurm-%A_%a.out
# Sweep '{experiment.name}' ({experiment.path}), written by mtp-sweep --emit slurm.
# Submit from the repository root: sbatch {experiment.results_dir}/sweep.sbatch
# Array task i trains point i with launch/slurm_gpu.sbatch (MTP_TRAIN_CMD is honoured there).
set -euo pipefail
cd "${{SLURM_SUBMIT_DIR:-.}}"
case ${{SLURM_ARRAY_TASK_ID:?run this as an array job: sbatch $0}} in
{cases}
  *) echo "error: sweep has no point ${{SLURM_ARRAY_TASK_ID}}" >&2; exit 2 ;;
esac
exec bash {LAUNCH}/slurm_gpu.sbatch "${{POINT[@]}}"
"""


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "sweep"


def emit_slurm(experiment: Experiment, dry_run: bool) -> int:
    path = experiment.results_dir / "sweep.sbatch"
    path.write_text(slurm_script(experiment))
    print(f"wrote {path} ({len(experiment.points)} array tasks)")
    if dry_run:
        print(f"+ sbatch {path}")
        return 0
    return subprocess.call(["sbatch", str(path)])


def emit_gke(experiment: Experiment, dry_run: bool) -> int:
    """One `launch/gke/submit.sh` call per point; with --dry-run it renders without applying."""
    kind = _cluster(experiment)["kind"]
    render_dir = experiment.results_dir / "gke"
    render_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RENDER_DIR": str(render_dir)}
    if dry_run:
        env.setdefault("IMAGE", "IMAGE")  # a placeholder: the manifest shows where the image goes
    failed = 0
    for point in experiment.points:
        env["NAME"] = f"mtp-{_slug(experiment.name)}-{point.index}"
        cmd = ["bash", str(LAUNCH / "gke" / "submit.sh"), *(["--dry-run"] if dry_run else []), kind, *_args(experiment, point)]
        failed += subprocess.call(cmd, env=env) != 0
    return 1 if failed else 0


def emit(experiment: Experiment, target: str, dry_run: bool) -> int:
    if not (LAUNCH / "slurm_gpu.sbatch").is_file():
        raise UserError("launch/ is not in the current directory; run mtp-sweep --emit from the repository root")
    claim_results_dir(experiment)
    return emit_slurm(experiment, dry_run) if target == "slurm" else emit_gke(experiment, dry_run)
