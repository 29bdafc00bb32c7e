"""Mutation check: each `*.patch` here is a one-line break of the code under test; applied in a
scratch copy of the repository, the tests it names must fail.

    python tests/mutations/run.py            # every patch
    python tests/mutations/run.py --ci       # CI: leaves out the patches marked `# slow: ...`
    python tests/mutations/run.py NAME ...   # some (file names without .patch)

A patch starts with comment lines before its diff: `# test: NODE` (one or more pytest node ids,
run with `-x`), `# why: ...`, and `# slow: REASON` where its test is in the slow lane (too long
for CI's budget: run it by hand when that code changes). The mutated package is imported from the scratch copy
(PYTHONPATH first; checked). A patch that no longer applies, a test run that errors out
(pytest exit status other than 0 or 1) or a mutation the tests miss makes the script exit 1.
The last line printed is a JSON summary.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def header(patch: Path) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in patch.read_text().splitlines():
        if line.startswith("diff --git"):
            break
        if line.startswith("# ") and ":" in line:
            key, value = line[2:].split(":", 1)
            fields.setdefault(key.strip(), []).append(value.strip())
    if not fields.get("test"):
        raise SystemExit(f"error: {patch.name} names no test (a '# test: NODE' line before the diff)")
    return fields


def scratch_copy(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked, ignored files left out)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_one(patch: Path) -> dict:
    fields, t0 = header(patch), time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutation-{patch.stem}-") as tmp:
        scratch = Path(tmp)
        scratch_copy(scratch)
        applied = subprocess.run(["git", "apply", "--verbose", str(patch)], cwd=scratch, capture_output=True, text=True)
        if applied.returncode != 0:
            return {"patch": patch.stem, "outcome": "does not apply", "detail": applied.stderr.strip()[-500:]}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(scratch), os.environ.get("PYTHONPATH", "")])}
        where = subprocess.run([sys.executable, "-c", "import mtp_jax; print(mtp_jax.__file__)"], cwd=scratch, env=env,
                               capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(scratch)):
            return {"patch": patch.stem, "outcome": "error", "detail": f"mtp_jax imported from {where}, not the copy"}
        tests = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *fields["test"]],
                               cwd=scratch, env=env, capture_output=True, text=True)
    tail = tests.stdout.strip().splitlines()[-1:] or [""]
    outcome = {0: "survived", 1: "caught"}.get(tests.returncode, f"error (pytest exit {tests.returncode})")
    return {"patch": patch.stem, "outcome": outcome, "tests": fields["test"], "seconds": round(time.time() - t0, 1),
            "detail": tail[0] if outcome == "caught" else (tests.stdout + tests.stderr)[-1500:]}


def main(names: list[str]) -> int:
    patches, skipped = sorted(HERE.glob("*.patch")), []
    if names[:1] == ["--ci"]:
        names = names[1:]
        skipped = [p.stem for p in patches if header(p).get("slow")]
        patches = [p for p in patches if p.stem not in skipped]
    if names:
        unknown = set(names) - {p.stem for p in patches}
        if unknown:
            raise SystemExit(f"error: no patch named {sorted(unknown)}; have {[p.stem for p in patches]}")
        patches = [p for p in patches if p.stem in names]
    results = []
    # One XLA compilation cache for every patch's tests (as tests/conftest.py does per session):
    # a mutated program has its own cache key, so nothing compiled from the unmutated code is reused for it.
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtp_jax_mutations_xla_cache_")
        atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    for patch in patches:
        result = run_one(patch)
        results.append(result)
        print(f"{result['patch']}: {result['outcome']} ({result.get('seconds', 0)} s) {result['detail']}", flush=True)
    bad = [r["patch"] for r in results if r["outcome"] != "caught"]
    print(json.dumps({"patches": len(results), "caught": len(results) - len(bad), "not_caught": bad,
                      "skipped_slow": skipped, "seconds": {r["patch"]: r.get("seconds") for r in results}}))
    return 1 if bad or not results else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
