"""Memory a command may still use, and the refusal of training sizes that cannot fit before anything is allocated."""

from __future__ import annotations

import os
from pathlib import Path

from mtp_jax.config import Config
from mtp_jax.errors import UserError


def available_bytes() -> int:
    """Free memory of the first local device, or the host's available (not total) RAM on CPU, which reports none."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return host_available_bytes()


def host_available_bytes() -> int:
    """Memory the host can give without swapping (MemAvailable), not its total RAM."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def training_lower_bound(cfg: Config, devices: int) -> int:
    """Bytes one device needs at least for a train step: one float32 activation per position, layer and model
    dimension kept for the backward pass, spread over every device. A lower bound, so a refusal is never wrong."""
    t, m = cfg.train, cfg.model
    return t.batch_size * t.seq_len * m.d_model * m.n_layers * 4 // max(devices, 1)


def check_training_fits(cfg: Config) -> None:
    """Refuses batch and sequence sizes whose lower bound exceeds what is free, with the numbers."""
    import jax

    need, free = training_lower_bound(cfg, jax.device_count()), available_bytes()
    if need > free:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} x train.seq_len={cfg.train.seq_len} needs at least "
            f"{need / 2**30:.1f} GiB per device for activations alone, but {free / 2**30:.1f} GiB is free; "
            f"lower train.seq_len or train.batch_size (or model.d_model, model.n_layers)"
        )
