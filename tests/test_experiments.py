"""Experiment files as data: each resolves to the config recorded in tests/golden/ (AXLearn style),
so an accidental change to a reproduction config fails here. Regenerate deliberately with
MTP_UPDATE_GOLDEN=1 pytest tests/test_experiments.py."""

import math
import os
from pathlib import Path

import jax
import pytest

from mtp_jax.config import ConfigError, load_config, to_yaml
from mtp_jax.model.transformer import MTP

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml")
                     if not p.name.startswith(("_", "sweep")))  # sweep*.yaml: mtp-sweep grids (tests/test_sweep.py)
GOLDEN = ROOT / "tests" / "golden"


def golden_path(path: Path) -> Path:
    return GOLDEN / str(path.relative_to(ROOT / "experiments")).replace("/", "__")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_experiment_matches_golden(path: Path) -> None:
    text = to_yaml(load_config(path))
    golden = golden_path(path)
    if os.environ.get("MTP_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.is_file(), f"no golden file for {path}; run with MTP_UPDATE_GOLDEN=1 once"
    assert text == golden.read_text(), f"{path} resolves differently from {golden}"


def test_every_golden_has_an_experiment() -> None:
    expected = {golden_path(p).name for p in EXPERIMENTS}
    assert {p.name for p in GOLDEN.glob("*.yaml")} == expected


@pytest.mark.slow
def test_paper_shapes_are_parameter_matched() -> None:
    """For every size, n = 1, 2 and 4 have the same number of parameters (counted from the
    model's parameter tree): the n - 1 extra heads cost exactly the trunk blocks they replace."""
    for size in ("0.3b", "0.6b", "1.3b", "3b", "6.7b", "13b"):
        counts = {}
        for n in (1, 2, 4):
            cfg = load_config(ROOT / "experiments" / "paper" / f"{size}_n{n}.yaml").model
            cfg.vocab_size = cfg.vocab_size or 32768
            params = MTP(cfg).abstract_params()
            assert params["heads"]["mlp"]["w_up"].shape[0] == n
            counts[n] = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
        assert len(set(counts.values())) == 1, (size, counts)


def test_include_cycle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_override_beats_include(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("model: {d_model: 64, attn_heads: 4}\ntrain: {steps: 5}\n")
    (tmp_path / "top.yaml").write_text("include: base.yaml\ntrain: {steps: 7}\n")
    cfg = load_config(tmp_path / "top.yaml", ["train.batch_size=4"])
    assert (cfg.model.d_model, cfg.train.steps, cfg.train.batch_size) == (64, 7, 4)
