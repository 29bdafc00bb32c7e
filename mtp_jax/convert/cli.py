"""`mtp-convert`: Meta / Hugging Face Llama checkpoints into run directories, and runs back out.

  mtp-convert from-meta SRC_DIR RUN_DIR      consolidated.*.pth + params.json + tokenizer.model
  mtp-convert from-hf SRC_DIR RUN_DIR [--add-heads N]   safetensors + config.json + tokenizer
  mtp-convert to-hf RUN_DIR OUT_DIR          trunk + head 1 as LlamaForCausalLM, heads 2..n beside it
  mtp-convert heads RUN_DIR NEW_RUN_DIR --keep K | --add-heads N   drop or add heads (NTP <-> MTP)

A converted run directory is an ordinary one (config.yaml, tokenizer/, checkpoints/) whose
checkpoint holds parameters only; mtp-eval and mtp-generate read it like any trained run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np

from mtp_jax.config import Config, ModelConfig, validate
from mtp_jax.convert import llama
from mtp_jax.convert.heads import new_head_count, resize_heads, resized_config
from mtp_jax.convert.files import read_json
from mtp_jax.convert.safetensors_io import read_metadata, read_safetensors, read_safetensors_dir, write_safetensors
from mtp_jax.convert.torch_zip import load_torch_file
from mtp_jax.data.tokenizer import SPM_FILE, PretrainedTokenizer
from mtp_jax.errors import ArgParser, UserError, guarded

SIDE_FILE = "mtp_heads.safetensors"
# Model-parallel shards of Meta checkpoints: column-parallel weights split rows, row-parallel split columns.
_SHARD_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


class _MergedShards(Mapping):
    """Meta's consolidated.NN.pth shards seen as one state dict; a tensor is joined only when read."""

    def __init__(self, shards: list[dict[str, np.ndarray]], files: list[Path]):
        self.shards, self.files = shards, files
        for shard, file in zip(shards[1:], files[1:]):
            if shard.keys() != shards[0].keys():
                name = min(shard.keys() ^ shards[0].keys())
                raise UserError(f"tensor '{name}' is in only some of the shards {files[0].name}, {file.name}")

    def __getitem__(self, name: str) -> np.ndarray:
        parts = [s[name] for s in self.shards]
        axis = _SHARD_AXIS.get(name.split(".")[-2])
        if len(parts) == 1 or axis is None:
            return parts[0]
        return np.concatenate(parts, axis=axis)

    def __contains__(self, name: object) -> bool:
        return name in self.shards[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shards[0])

    def __len__(self) -> int:
        return len(self.shards[0])

    def shape(self, name: str) -> tuple[int, ...]:
        """The joined shape; shards must agree on every other axis (and on all of them for a replicated tensor)."""
        shapes = [tuple(s[name].shape) for s in self.shards]
        axis = _SHARD_AXIS.get(name.split(".")[-2]) if len(shapes) > 1 else None
        if axis is not None and len(shapes[0]) > axis:
            rest = {s[:axis] + s[axis + 1:] for s in shapes}
            if len(rest) == 1 and all(len(s) == len(shapes[0]) for s in shapes):
                return tuple(sum(s[axis] for s in shapes) if a == axis else n for a, n in enumerate(shapes[0]))
        elif len(set(shapes)) == 1:
            return shapes[0]
        raise UserError(f"tensor '{name}' has shapes {', '.join(map(str, shapes))} in the shards "
                        f"{', '.join(f.name for f in self.files)}, which do not join")


@dataclasses.dataclass
class _ShapeOnly:
    shape: tuple[int, ...]


def _shape_view(merged: _MergedShards) -> dict:
    """What `check_tensors` reads (name -> .shape) without joining shards."""
    return {name: _ShapeOnly(merged.shape(name)) for name in merged}


# --- Meta ------------------------------------------------------------------------------------------
def meta_model_config(params: dict, vocab_rows: int) -> ModelConfig:
    """Our model config from Meta's params.json (n_layers counts trunk plus every head block)."""
    where = "params.json"
    dim = llama.count(params, "dim", where)
    vocab = llama.field(params, "vocab_size", where, -1)
    if vocab not in (-1, vocab_rows):
        raise UserError(f"params.json vocab_size={vocab!r} disagrees with tok_embeddings.weight's {vocab_rows} rows")
    multiplier = llama.real(params, "ffn_dim_multiplier", where) if params.get("ffn_dim_multiplier") is not None else None
    d_ff = llama.meta_ffn_width(dim, llama.count(params, "multiple_of", where, 256), multiplier)
    n_heads = llama.count(params, "n_heads", where)
    return ModelConfig(
        vocab_size=vocab_rows, d_model=dim, n_layers=llama.count(params, "n_layers", where),
        attn_heads=n_heads, kv_heads=llama.count(params, "n_kv_heads", where, n_heads), head_dim=dim // n_heads,
        d_ff=d_ff, mtp_heads=llama.count(params, "n_future_tokens", where, 1),
        rope_theta=llama.real(params, "rope_theta", where, 10000.0), rope_layout="interleaved",
        norm_eps=llama.real(params, "norm_eps", where, 1e-5), dtype="float32",
    )


def from_meta(src: Path, run_dir: Path, tokenizer_path: Path | None) -> ModelConfig:
    shards = sorted(src.glob("consolidated.*.pth"))
    if not shards or not (src / "params.json").is_file():
        raise UserError(f"'{src}' needs params.json and consolidated.*.pth (Meta's Llama format)")
    params_json = read_json(src / "params.json")
    tensors = _MergedShards([load_torch_file(p) for p in shards], shards)
    if "tok_embeddings.weight" not in tensors or len(tensors.shape("tok_embeddings.weight")) != 2:
        raise UserError(f"checkpoint {src} lacks a 2-D tensor 'tok_embeddings.weight'; is it a Llama-format state dict?")
    cfg = meta_model_config(params_json, tensors.shape("tok_embeddings.weight")[0])
    validate(Config(model=cfg))
    prefixes = llama.block_prefixes(cfg, llama.META)
    implied = (f"params.json (dim={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.attn_heads}, "
               f"n_kv_heads={cfg.kv_heads_}, n_future_tokens={cfg.mtp_heads}, FFN width {cfg.d_ff})")
    llama.check_tensors(_shape_view(tensors), llama.expected(cfg, llama.META, prefixes), str(src), implied)
    tok = tokenizer_path or next((p for p in (src / SPM_FILE, src.parent / SPM_FILE) if p.is_file()), None)
    if tok is None:
        raise UserError(f"no {SPM_FILE} in '{src}' or its parent; pass --tokenizer PATH")
    write_run(run_dir, cfg, llama.import_params(tensors, cfg, llama.META, prefixes), PretrainedTokenizer(tok))
    return cfg


# --- Hugging Face -----------------------------------------------------------------------------------
def _hf_supported(hf: dict) -> None:
    where = "config.json"
    llama.field(hf, "model_type", where, check=lambda v: v == "llama")
    llama.field(hf, "rope_parameters", where, {}, check=lambda v: isinstance(v, dict))
    llama.field(hf, "tie_word_embeddings", where, False, check=lambda v: isinstance(v, bool))
    for key, ok in (("hidden_act", "silu"), ("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) != ok:
            raise UserError(f"config.json field {key}={hf[key]!r} is not supported by mtp-convert (needs {ok!r})")
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise UserError(f"config.json field rope_parameters.rope_type={rope_type!r} is not supported by mtp-convert (needs 'default')")


def _rope_theta(hf: dict) -> float:
    """transformers >= 5 writes rope_parameters.rope_theta; earlier versions a top-level rope_theta."""
    where = "config.json"
    return llama.real(hf.get("rope_parameters") or {}, "rope_theta", where, llama.real(hf, "rope_theta", where, 10000.0))


def hf_model_config(hf: dict, heads: int) -> ModelConfig:
    _hf_supported(hf)
    where = "config.json"
    d, n_heads = llama.count(hf, "hidden_size", where), llama.count(hf, "num_attention_heads", where)
    return ModelConfig(
        vocab_size=llama.count(hf, "vocab_size", where), d_model=d,
        n_layers=llama.count(hf, "num_hidden_layers", where) - 1 + heads, attn_heads=n_heads,
        kv_heads=llama.count(hf, "num_key_value_heads", where, n_heads),
        head_dim=llama.count(hf, "head_dim", where, max(d // n_heads, 1)),
        d_ff=llama.count(hf, "intermediate_size", where), mtp_heads=heads,
        rope_theta=_rope_theta(hf), norm_eps=llama.real(hf, "rms_norm_eps", where, 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings") is True, dtype="float32",
    )


def _hf_tokenizer(src: Path) -> PretrainedTokenizer:
    """tokenizer.json with tokenizer_config.json's end and start tokens (no start token where
    add_bos_token is false: such a model's documents start bare)."""
    if (src / "tokenizer.json").is_file():
        config = {}
        if (src / "tokenizer_config.json").is_file():
            config = read_json(src / "tokenizer_config.json")
        token = lambda key: (lambda t: t.get("content") if isinstance(t, dict) else t)(config.get(key))
        bos = token("bos_token") if config.get("add_bos_token", True) else None
        return PretrainedTokenizer(src / "tokenizer.json", token("eos_token"), bos)
    if (src / SPM_FILE).is_file():
        return PretrainedTokenizer(src / SPM_FILE)
    raise UserError(f"'{src}' holds no tokenizer.json or {SPM_FILE}")


def from_hf(src: Path, run_dir: Path, add_heads: int) -> ModelConfig:
    if not (src / "config.json").is_file():
        raise UserError(f"'{src}' has no config.json; point at a Hugging Face Llama model folder")
    tensors = dict(read_safetensors_dir(src))
    side = read_safetensors(src / SIDE_FILE) if (src / SIDE_FILE).is_file() else {}
    extra, layout = _side_metadata(src / SIDE_FILE)
    cfg = hf_model_config(read_json(src / "config.json"), 1 + extra + add_heads)
    validate(Config(model=cfg))
    main = llama.block_prefixes(dataclasses.replace(cfg, mtp_heads=1, n_layers=cfg.n_layers - extra - add_heads), llama.HF)
    implied = (f"config.json (hidden_size={cfg.d_model}, num_hidden_layers={len(main)}, "
               f"num_attention_heads={cfg.attn_heads}, intermediate_size={cfg.d_ff}, vocab_size={cfg.vocab_size})")
    llama.check_tensors(tensors, llama.expected(cfg, llama.HF, main), str(src), implied)
    side_prefixes = [f"extra_heads.{j}." for j in range(extra)]
    llama.check_tensors(side, llama.expected(cfg, llama.HF, side_prefixes, top=False), str(src / SIDE_FILE),
                        f"its n_future_tokens={extra + 1}")
    cfg = dataclasses.replace(cfg, rope_layout=layout)
    permute = np.argsort(llama.half_permutation(cfg.head_dim_)) if layout == "interleaved" else None
    prefixes = main + side_prefixes + [main[-1]] * add_heads  # new heads start as copies of head 1
    write_run(run_dir, cfg, llama.import_params({**tensors, **side}, cfg, llama.HF, prefixes, permute), _hf_tokenizer(src))
    return cfg


def _side_metadata(path: Path) -> tuple[int, str]:
    """The side file's extra head count (n_future_tokens - 1) and RoPE layout; (0, 'half') without one."""
    meta = read_metadata(path) if path.is_file() else {}
    n, layout = meta.get("n_future_tokens", "1"), meta.get("rope_layout", "half")
    if not n.isdecimal() or int(n) < 1 or layout not in ("half", "interleaved"):
        raise UserError(f"'{path}' metadata n_future_tokens={n!r}, rope_layout={layout!r} is not a count >= 1 "
                        f"and one of half, interleaved")
    return int(n) - 1, layout


def to_hf(run_dir: Path, out: Path) -> ModelConfig:
    from mtp_jax.run import load_run

    config, tokenizer, _, params = load_run(run_dir)
    cfg = config.model
    if cfg.head_type != "transformer":
        raise UserError(f"model.head_type={cfg.head_type!r}: only transformer heads map onto Llama blocks")
    params = {k: _numpy_tree(v) for k, v in params.items()}
    permute = llama.half_permutation(cfg.head_dim_) if cfg.rope_layout == "interleaved" else None
    main = llama.block_prefixes(dataclasses.replace(cfg, mtp_heads=1, n_layers=cfg.trunk_layers + 1), llama.HF)
    heads = {k: {kk: vv[:1] for kk, vv in v.items()} for k, v in params["heads"].items()}
    extra = {k: {kk: vv[1:] for kk, vv in v.items()} for k, v in params["heads"].items()}
    tensors = llama.export_top(params, cfg, llama.HF)
    tensors.update(llama.export_blocks(params["trunk"], cfg, main[:-1], llama.HF, permute))
    tensors.update(llama.export_blocks(heads, cfg, main[-1:], llama.HF, permute))
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    side = llama.export_blocks(extra, cfg, [f"extra_heads.{j}." for j in range(cfg.mtp_heads - 1)], llama.HF, permute)
    write_safetensors(out / SIDE_FILE, side, {"n_future_tokens": str(cfg.mtp_heads), "rope_layout": cfg.rope_layout})
    (out / "config.json").write_text(json.dumps(_hf_config(cfg, len(main), tokenizer), indent=2))
    _export_tokenizer(tokenizer, out)
    return cfg


def change_heads(run_dir: Path, new_dir: Path, keep: int | None, add: int | None) -> ModelConfig:
    """`mtp-convert heads`: the newest checkpoint's parameters with heads dropped or added, as a new run."""
    from mtp_jax.run import load_run

    config, tokenizer, _, params = load_run(run_dir)  # the config as trained
    n_new = new_head_count(config.model.mtp_heads, keep, add)
    cfg, notes = resized_config(config, n_new, str(new_dir))
    params = {k: _numpy_tree(v) for k, v in params.items()}
    save_run(new_dir, cfg, {**params, "heads": resize_heads(params["heads"], n_new)}, tokenizer)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return cfg.model


def _numpy_tree(tree: dict) -> dict:
    return {k: _numpy_tree(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


def _hf_config(cfg: ModelConfig, layers: int, tokenizer: object) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff_, "num_hidden_layers": layers, "num_attention_heads": cfg.attn_heads,
        "num_key_value_heads": cfg.kv_heads_, "head_dim": cfg.head_dim_, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "max_position_embeddings": 4096, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32", "eos_token_id": int(getattr(tokenizer, "eot_id", 0)),
    }


def _export_tokenizer(tokenizer: object, out: Path) -> None:
    """Pretrained and BPE tokenizers have a Hugging Face form; raw bytes have none."""
    if hasattr(tokenizer, "export_hf"):
        tokenizer.export_hf(out)
    else:
        print(f"warning: tokenizer '{tokenizer.name}' has no Hugging Face form; {out} has weights only", file=sys.stderr)


# --- run directory ----------------------------------------------------------------------------------
def write_run(run_dir: Path, model_cfg: ModelConfig, params: dict, tokenizer: PretrainedTokenizer) -> None:
    """config.yaml, versions.json, tokenizer/ and a step-0 checkpoint holding the parameters only."""
    cfg = Config(model=model_cfg)
    cfg.data.tokenizer = "pretrained"
    save_run(run_dir, cfg, params, tokenizer)


def check_new_run_dir(run_dir: Path) -> None:
    """A conversion makes a new run directory: RUN_DIR must not exist, or be an empty folder."""
    if run_dir.exists() and not (run_dir.is_dir() and not any(run_dir.iterdir())):
        raise UserError(f"'{run_dir}' already exists and is not an empty folder; convert into a new directory")


@contextlib.contextmanager
def _staged(run_dir: Path) -> Iterator[Path]:
    """A hidden sibling folder that is renamed to `run_dir` when the block completes and removed when it
    fails or is interrupted: a conversion leaves a whole run directory or none."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_dir.parent / f".{run_dir.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        check_new_run_dir(run_dir)
        os.rename(tmp, run_dir)  # replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_run(run_dir: Path, cfg: Config, params: dict, tokenizer: object) -> None:
    """A run directory for `cfg` whose checkpoint (step 0) holds `params` only: mtp-train fine-tunes it."""
    from mtp_jax.checkpoint import Checkpointer
    from mtp_jax.run import write_run_files

    check_new_run_dir(run_dir)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run_dir)))
    validate(cfg)
    with _staged(run_dir) as tmp:
        write_run_files(tmp, cfg)
        tokenizer.save(tmp / "tokenizer")
        ckpt = Checkpointer(tmp / "checkpoints", keep=1, save_every=1, async_save=False)
        try:
            ckpt.save(0, {"params": params}, {}, force=True)
            ckpt.wait()
        finally:
            ckpt.close()


@guarded
def main(argv: list[str]) -> int:
    parser = ArgParser(prog="mtp-convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    meta = sub.add_parser("from-meta", help="Meta Llama / multi-token .pth checkpoint -> run directory")
    meta.add_argument("src", type=Path)
    meta.add_argument("run_dir", type=Path)
    meta.add_argument("--tokenizer", type=Path, default=None, help=f"{SPM_FILE} if not in SRC or its parent")
    hf = sub.add_parser("from-hf", help="Hugging Face Llama safetensors -> run directory")
    hf.add_argument("src", type=Path)
    hf.add_argument("run_dir", type=Path)
    hf.add_argument("--add-heads", type=int, default=0, help="extra heads initialised from the last block")
    out = sub.add_parser("to-hf", help="run directory -> Hugging Face Llama folder (+ extra heads side file)")
    out.add_argument("run_dir", type=Path)
    out.add_argument("out_dir", type=Path)
    resize = sub.add_parser("heads", help="run directory -> new run directory with fewer or more heads (NTP <-> MTP)")
    resize.add_argument("run_dir", type=Path)
    resize.add_argument("new_run_dir", type=Path)
    resize.add_argument("--keep", type=int, default=None, help="keep heads 1..K (K = 1: the next-token model)")
    resize.add_argument("--add-heads", type=int, default=None, help="add N heads, copies of the last one")
    args = parser.parse_args(argv)
    if args.command != "to-hf":
        check_new_run_dir(getattr(args, "new_run_dir", None) or args.run_dir)
    if args.command == "from-meta":
        cfg = from_meta(args.src, args.run_dir, args.tokenizer)
    elif args.command == "from-hf":
        if args.add_heads < 0:
            raise UserError(f"--add-heads={args.add_heads} must be >= 0")
        cfg = from_hf(args.src, args.run_dir, args.add_heads)
    elif args.command == "heads":
        cfg = change_heads(args.run_dir, args.new_run_dir, args.keep, args.add_heads)
    else:
        cfg = to_hf(args.run_dir, args.out_dir)
    target = getattr(args, "out_dir", None) or getattr(args, "new_run_dir", None) or args.run_dir
    print(f"{args.command}: {cfg.n_layers} blocks, n = {cfg.mtp_heads} heads, d_model {cfg.d_model}, "
          f"vocab {cfg.vocab_size} -> {target}")
    return 0


if __name__ == "__main__":  # python -m mtp_jax.convert.cli ... (the mtp-convert entry point)
    main()
