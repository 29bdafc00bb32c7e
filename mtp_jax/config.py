"""Typed run configuration: dataclasses loaded from YAML plus `dotted.key=value` overrides.

Every field is validated before anything compiles, and every problem is one
`ConfigError` line that names the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mtp_jax.errors import ConfigError
from mtp_jax.model.head_kinds import HEAD_KINDS, head_kind

__all__ = ["Config", "ConfigError", "load_config", "from_dict", "to_dict", "to_yaml", "validate"]



@dataclasses.dataclass
class ModelConfig:
    """Transformer shape. `n_layers` is the TOTAL depth, trunk plus head blocks (parameter matching).

    As in the paper (7B: 32 layers, n=4 -> 28 trunk + 4 head layers), transformer heads take
    `mtp_heads` blocks from the total, so n=1 is a plain n_layers-deep next-token model whose
    last block is head 1. Kinds without a block (`head_kinds.py`) take none.
    """

    vocab_size: int = 0  # 0 = take it from the tokenizer
    d_model: int = 256
    n_layers: int = 6
    attn_heads: int = 4
    kv_heads: int = 0  # 0 = attn_heads (no grouping)
    head_dim: int = 0  # 0 = d_model // attn_heads
    d_ff: int = 0  # 0 = SwiGLU default: 8/3 d_model rounded up to a multiple of ffn_multiple
    ffn_multiple: int = 64  # 256 = Llama's rounding (11008 at d_model 4096)
    mtp_heads: int = 4  # n: head i predicts token t+i
    head_type: str = "transformer"  # a kind of mtp_jax/model/head_kinds.py: transformer | linear | causal | ...
    rope_theta: float = 10000.0
    rope_layout: str = "half"  # half (rotate halves of the head dim, Hugging Face) | interleaved (pairs, Meta)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    remat: str = "none"  # none | full | dots  (per trunk block)
    layer_loop: str = "auto"  # auto | scan | unroll (trunk blocks, and the train step's head loop); auto unrolls
    # trunks of up to 16 blocks on CPU only (see transformer.py)
    attention: str = "auto"  # auto | xla | blockwise | cudnn | splash (see mtp_jax/model/attention.py)
    dtype: str = "auto"  # compute dtype: auto (bf16 on GPU/TPU, fp32 on CPU) | float32 | bfloat16; params stay fp32

    @property
    def trunk_layers(self) -> int:
        return self.n_layers - (self.mtp_heads if head_kind(self.head_type).block else 0)

    @property
    def kv_heads_(self) -> int:
        return self.kv_heads or self.attn_heads

    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.d_model // self.attn_heads

    @property
    def d_ff_(self) -> int:
        return self.d_ff or -(-int(8 * self.d_model / 3) // self.ffn_multiple) * self.ffn_multiple


@dataclasses.dataclass
class OptimConfig:
    """AdamW with decoupled weight decay, global-norm clipping, warmup then cosine decay."""

    lr: float = 3e-4
    warmup_steps: int = 100
    final_lr_ratio: float = 0.03
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass
class DataConfig:
    """Where text comes from and how it becomes windows of seq_len + mtp_heads tokens."""

    source: str = "stdlib"  # stdlib | files | jsonl | prepared | induction | polynomial (generated, tasks/)
    path: str = ""  # folder, glob, .jsonl file, or mtp-prepare's OUT_DIR (unused for stdlib and generated tasks)
    text_field: str = "text"  # JSONL field holding the document
    tokenizer: str = "bytes"  # bytes | bpe | pretrained (a converted checkpoint's, in RUN_DIR/tokenizer/)
    bpe_vocab_size: int = 4096
    bpe_train_chars: int = 20_000_000  # BPE trains on at most this many characters, spread over the input
    val_fraction: float = 0.05
    max_bytes: int = 0  # cap on corpus bytes read (0 = all); keeps tiny runs fast
    shuffle_seed: int = 0
    worker_count: int = 0  # Grain worker processes (0 = in-process)
    # Generated task sources (induction, polynomial): see mtp_jax/tasks/.
    task_train_examples: int = 20000  # training documents generated from task_seed
    task_test_examples: int = 200  # held-out test stories (induction) or expressions per m (polynomial)
    task_seed: int = 0  # seeds the training documents; test sets are fixed, disjoint from training
    task_train_ops: int = 5  # polynomial: training m uniform in 1..task_train_ops (in-domain)
    task_test_ops: int = 10  # polynomial: test m = 1..task_test_ops (out-of-domain above train_ops)


@dataclasses.dataclass
class MeshConfig:
    """Device mesh. -1 = the rest of the devices. dcn_* multiply across slices/hosts."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    # logical axis -> mesh axes; a logical axis not listed is replicated.
    rules: list = dataclasses.field(
        default_factory=lambda: [
            ["batch", ["data", "fsdp"]],
            ["embed", ["fsdp"]],
            ["mlp", ["tensor"]],
            ["q_heads", ["tensor"]],
            ["kv_heads", ["tensor"]],
            ["vocab", ["tensor"]],
        ]
    )


@dataclasses.dataclass
class DistributedConfig:
    """jax.distributed settings; empty/-1 values are auto-detected (TPU pod, SLURM) or single-process."""

    coordinator_address: str = ""
    num_processes: int = -1
    process_id: int = -1
    initialization_timeout: int = 300
    heartbeat_timeout: int = 60  # seconds before a silent peer is declared dead


@dataclasses.dataclass
class TrainConfig:
    """The training loop."""

    run_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 8  # global sequences per step
    seq_len: int = 256  # T: each window holds T + mtp_heads tokens
    micro_batches: int = 1  # gradient accumulation
    seed: int = 0
    loss_weights: list = dataclasses.field(default_factory=list)  # per head; empty = all 1
    loss_schedule: str = "constant"  # constant | linear (across heads) | deepseek (see mtp_jax/loss_schedule.py)
    loss_lambda_start: float = 0.3  # deepseek: heads 2..n share lambda, this before loss_lambda_step
    loss_lambda_end: float = 0.1  # deepseek: lambda from loss_lambda_step on
    loss_lambda_step: int = 0  # deepseek: the step lambda switches (0 = never)
    n_curriculum: str = "none"  # none | forward (start at n = 1, add heads) | reverse (drop heads down to 1)
    curriculum_every: int = 100  # steps per curriculum stage (one head added or dropped each)
    ce_chunk: int = 256  # sequence positions per cross-entropy chunk (256: 0.88-0.90x the n = 1 step of 512 at B 8, V 8192)
    step_impl: str = "flat"  # flat (memory-flat heads) | naive (all logits at once)
    log_every: int = 10
    eval_every: int = 0  # held-out evaluation every N steps into evals/heldout/ (0 = only at the end)
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 = look up the device kind
    max_skipped_steps: int = 0  # non-finite steps skipped (update not applied) before the run stops as diverged
    allow_data_change: bool = False  # resume even though the data source or tokenizer settings changed


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


_CHOICES = {
    "model.head_type": tuple(HEAD_KINDS),
    "model.remat": ("none", "full", "dots"),
    "model.layer_loop": ("auto", "scan", "unroll"),
    "model.rope_layout": ("half", "interleaved"),
    "model.dtype": ("auto", "float32", "bfloat16"),
    "model.attention": ("auto", "xla", "blockwise", "cudnn", "splash"),
    "data.source": ("stdlib", "files", "jsonl", "prepared", "arrayrecord", "induction", "polynomial"),
    "data.tokenizer": ("bytes", "bpe", "pretrained"),
    "train.step_impl": ("flat", "naive"),
    "train.loss_schedule": ("constant", "linear", "deepseek"),
    "train.n_curriculum": ("none", "forward", "reverse"),
}


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{match[0]}'?)" if match else f" (known: {', '.join(options)})"


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Converts a YAML/CLI value to the field's type, or raises a ConfigError naming it."""
    if isinstance(typ, str):
        typ = eval(typ, {"list": list, "int": int, "float": float, "str": str, "bool": bool})  # noqa: S307
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r} is not a boolean; use true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer; give a whole number")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not an integer; give a whole number") from None
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not a number; give e.g. 3e-4") from None
    if typ is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}={value!r} is not a string; quote it in YAML")
        return str(value)
    if typ is list or origin is list:
        if isinstance(value, str):
            value = _parse_yaml_value(value, key, "a list like [1, 0.5]") if value.strip() else []
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is not a list; write it as [a, b, ...]")
        return value
    if isinstance(typ, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    return value


def _parse_yaml_value(raw: str, key: str, example: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}={raw!r} is not valid YAML ({str(err).splitlines()[0]}); write it as {example}") from None


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    names = [f.name for f in dataclasses.fields(obj)]
    hints = {f.name: f.type for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{_closest(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, _Raw):
                value = _parse_yaml_value(value, full, "{field: value}")
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' is a section; set its fields as {full}.<field>=value")
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


class _Raw(str):
    """An override's text: each field's type parses it, so `data.path=*.txt` or `yes` stays a string."""


def _unquote(raw: str) -> str:
    return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw


def _override_to_dict(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override {item!r} has no '='; write it as section.key=value")
    dotted, raw = item.split("=", 1)
    value: Any = _Raw(_unquote(raw.strip()))
    for part in reversed(dotted.strip().split(".")):
        value = {part: value}
    return value


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping; `include: other.yaml` (relative to this file) is merged first, this file on top."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as experiments/quickstart.yaml")
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' includes itself; remove the include cycle")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(loaded).__name__}")
    include = loaded.pop("include", None)
    if include is None:
        return loaded
    if not isinstance(include, str) or not include.strip():
        raise ConfigError(f"config file '{path}' has include: {include!r}; give one file name, e.g. include: base.yaml")
    return _merge(_read_yaml(path.parent / include, seen + (path.resolve(),)), loaded)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML experiment file, applies `a.b=c` overrides, validates the result."""
    cfg = Config()
    if path is not None:
        _apply(cfg, _read_yaml(Path(path)))
    for item in overrides:
        _apply(cfg, _override_to_dict(item))
    validate(cfg)
    return cfg


def from_dict(d: dict) -> Config:
    """Rebuilds a Config from `to_dict` output (e.g. a run's saved config.yaml)."""
    cfg = Config()
    _apply(cfg, d)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# Lower bounds of the numeric fields no rule below covers (inclusive; a float one also excludes the bound when
# marked ">"): every number of a config is range-checked at load time, and every float must be finite.
_LOWER = {
    "model.rope_theta": (">", 0), "model.norm_eps": (">", 0), "model.init_std": (">", 0),
    "data.bpe_vocab_size": (">=", 1), "data.max_bytes": (">=", 0), "data.shuffle_seed": (">=", 0),
    "data.worker_count": (">=", 0), "data.task_train_examples": (">=", 1), "data.task_test_examples": (">=", 1),
    "data.task_seed": (">=", 0), "data.task_train_ops": (">=", 1), "data.task_test_ops": (">=", 1),
    "train.seed": (">=", 0), "train.peak_flops": (">=", 0), "mesh.data": (">=", -1), "mesh.fsdp": (">=", -1),
    "mesh.tensor": (">=", -1), "mesh.dcn_data": (">=", 1), "mesh.dcn_fsdp": (">=", 1),
    "distributed.num_processes": (">=", -1), "distributed.process_id": (">=", -1),
    "distributed.initialization_timeout": (">=", 1), "distributed.heartbeat_timeout": (">=", 1),
}


def _check_numbers(cfg: Config) -> None:
    """Finite floats everywhere, and the lower bounds of `_LOWER`."""
    for section in dataclasses.fields(cfg):
        for field in dataclasses.fields(getattr(cfg, section.name)):
            key, value = f"{section.name}.{field.name}", getattr(getattr(cfg, section.name), field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            _check(math.isfinite(value), f"{key}={value} must be a finite number")
            if key in _LOWER:
                op, bound = _LOWER[key]
                _check(value > bound if op == ">" else value >= bound, f"{key}={value} must be {op} {bound}")


def validate(cfg: Config) -> None:
    """Shape and range checks that would otherwise surface as errors deep inside JAX."""
    _check_numbers(cfg)
    for key, options in _CHOICES.items():
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        _check(value in options, f"{key}={value!r} is not one of {', '.join(options)}")
    m, t, o = cfg.model, cfg.train, cfg.optim
    _check(m.mtp_heads >= 1, f"model.mtp_heads={m.mtp_heads} must be >= 1 (1 = plain next-token model)")
    _check(
        m.trunk_layers >= 1,
        f"model.n_layers={m.n_layers} leaves no trunk for model.mtp_heads={m.mtp_heads}; "
        f"set n_layers >= {m.n_layers - m.trunk_layers + 1} (block heads take mtp_heads of the n_layers blocks)",
    )
    _check(not (head_kind(m.head_type).own_unembedding and m.tie_embeddings),
           f"model.head_type={m.head_type} gives every head its own unembedding; set model.tie_embeddings=false")
    for name in ("d_model", "attn_heads", "ffn_multiple"):
        _check(getattr(m, name) >= 1, f"model.{name}={getattr(m, name)} must be >= 1")
    _check(
        m.head_dim > 0 or m.d_model % m.attn_heads == 0,
        f"model.d_model={m.d_model} is not divisible by model.attn_heads={m.attn_heads}; change one or set model.head_dim",
    )
    _check(
        m.attn_heads % m.kv_heads_ == 0,
        f"model.attn_heads={m.attn_heads} is not a multiple of model.kv_heads={m.kv_heads}; pick kv_heads dividing it",
    )
    for name in ("kv_heads", "head_dim", "d_ff"):
        _check(getattr(m, name) >= 0, f"model.{name}={getattr(m, name)} must be >= 0 (0 = automatic)")
    _check(m.head_dim_ % 2 == 0, f"head dimension {m.head_dim_} must be even for rotary embeddings; change model.head_dim")
    _check(m.vocab_size >= 0, f"model.vocab_size={m.vocab_size} must be >= 0 (0 = from the tokenizer)")
    _check(
        t.seq_len >= 2 * m.mtp_heads,
        f"train.seq_len={t.seq_len} is too short for model.mtp_heads={m.mtp_heads}; use seq_len >= {2 * m.mtp_heads}",
    )
    _check(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _check(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1")
    _check(t.micro_batches >= 1, f"train.micro_batches={t.micro_batches} must be >= 1")
    _check(
        t.batch_size % t.micro_batches == 0,
        f"train.batch_size={t.batch_size} is not divisible by train.micro_batches={t.micro_batches}",
    )
    _check(t.ce_chunk >= 1, f"train.ce_chunk={t.ce_chunk} must be >= 1")
    _check(
        not t.loss_weights or len(t.loss_weights) == m.mtp_heads,
        f"train.loss_weights has {len(t.loss_weights)} entries but model.mtp_heads={m.mtp_heads}; give one per head or []",
    )
    _check(
        all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in t.loss_weights)
        and (not t.loss_weights or sum(t.loss_weights) > 0),
        f"train.loss_weights={t.loss_weights} must be numbers >= 0, not all 0 (a negative weight maximises that "
        f"head's loss); e.g. [1, 0.5]",
    )
    for name in ("loss_lambda_start", "loss_lambda_end", "loss_lambda_step"):
        _check(getattr(t, name) >= 0, f"train.{name}={getattr(t, name)} must be >= 0 (DeepSeek-V3: 0.3 then 0.1)")
    _check(t.curriculum_every >= 1, f"train.curriculum_every={t.curriculum_every} must be >= 1 (steps per stage)")
    _check(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0 = only at the end)")
    _check(t.eval_batches >= 1, f"train.eval_batches={t.eval_batches} must be >= 1")
    _check(t.max_skipped_steps >= 0, f"train.max_skipped_steps={t.max_skipped_steps} must be >= 0")
    _check(t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1")
    _check(t.checkpoint_every >= 1, f"train.checkpoint_every={t.checkpoint_every} must be >= 1")
    _check(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1")
    _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(0 <= o.final_lr_ratio <= 1, f"optim.final_lr_ratio={o.final_lr_ratio} must be in [0, 1]")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(o.clip_norm > 0, f"optim.clip_norm={o.clip_norm} must be > 0 (global-norm clipping; e.g. 1.0)")
    for name in ("b1", "b2"):
        _check(0 <= getattr(o, name) < 1, f"optim.{name}={getattr(o, name)} must be in [0, 1), e.g. 0.9 / 0.95")
    _check(o.eps > 0, f"optim.eps={o.eps} must be > 0, e.g. 1e-8")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0, e.g. 0.1")
    _check(0 < cfg.data.val_fraction < 1, f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    _check(cfg.data.source != "arrayrecord",
           "data.source=arrayrecord was replaced by the prepared token store: run `mtp-prepare CONFIG OUT_DIR` on the "
           "text and set data.source=prepared data.path=OUT_DIR (same text and tokenizer give the same batches)")
    _check(cfg.data.bpe_train_chars > 0, f"data.bpe_train_chars={cfg.data.bpe_train_chars} must be > 0")
    _check(
        cfg.data.source in ("stdlib", "induction", "polynomial") or cfg.data.path.strip() != "",
        f"data.path is empty but data.source={cfg.data.source!r} needs it; set data.path=/path/to/data",
    )
    for rule in cfg.mesh.rules:
        _check(
            isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str),
            f"mesh.rules entry {rule!r} must be [logical_axis, [mesh_axis, ...]]",
        )
