"""`mtp-prepare CONFIG.yaml OUT_DIR [section.key=value ...]`: tokenize a text corpus once into
ArrayRecord shards, so that training on it never re-reads or re-tokenizes text.

OUT_DIR receives tokenizer/, train-0000i-of-0000K.array_record, val-... (one record per
document: its int32 token ids, little endian, no EOT) and data_manifest.json. Train on it with
data.source=arrayrecord data.path='OUT_DIR/*.array_record'.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from mtp_jax.config import load_config
from mtp_jax.errors import ArgParser, ConfigError, guarded
from mtp_jax.data.pipeline import MANIFEST_FILE, build_tokenizer, require_split, tokenize
from mtp_jax.data.sources import SPLITS, read_corpus, to_record

SHARD_BYTES = 64 * 2**20


def shard_groups(documents: list[np.ndarray], shard_bytes: int = SHARD_BYTES) -> list[list[np.ndarray]]:
    """Consecutive documents in groups of about shard_bytes (a larger document gets its own shard)."""
    groups: list[list[np.ndarray]] = [[]]
    size = 0
    for doc in documents:
        if groups[-1] and size + doc.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(doc)
        size += doc.nbytes
    return groups if groups[-1] else []


def write_shards(out: Path, split: str, documents: list[np.ndarray]) -> list[str]:
    from array_record.python.array_record_module import ArrayRecordWriter

    groups = shard_groups(documents)
    names = []
    for i, group in enumerate(groups):
        path = out / f"{split}-{i:05d}-of-{len(groups):05d}.array_record"
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for doc in group:
            writer.write(to_record(doc))
        writer.close()
        names.append(path.name)
    return names


def prepare(config_path: str, out_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Writes the shards, the tokenizer and the manifest; returns the manifest."""
    cfg = load_config(config_path, overrides)
    if cfg.data.source == "arrayrecord":
        raise ConfigError("data.source=arrayrecord is already prepared; set data.source to stdlib, files or jsonl")
    out = Path(out_dir)
    if any(out.glob("*.array_record")):
        raise ConfigError(f"OUT_DIR '{out}' already holds .array_record shards; choose an empty folder or delete them")
    corpus = read_corpus(cfg.data)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(cfg.data, out, corpus)
    docs = tokenize(corpus, tokenizer)
    tokens = {s: sum(len(d) + 1 for d in docs[s]) for s in SPLITS}
    for split in SPLITS:
        require_split(split, tokens[split], cfg.data)
    manifest = corpus.manifest()
    for split in SPLITS:
        manifest["totals"][split]["tokens"] = tokens[split]
    manifest.update(tokenizer=tokenizer.name, shards={s: write_shards(out, s, docs[s]) for s in SPLITS})
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


@guarded
def main(argv: list[str]) -> int:
    parser = ArgParser(prog="mtp-prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML whose data section names the corpus and tokenizer")
    parser.add_argument("out_dir", help="folder for the shards, tokenizer/ and data_manifest.json")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.max_bytes=1000000")
    args = parser.parse_args(argv)
    manifest = prepare(args.config, args.out_dir, args.overrides)
    totals = manifest["totals"]
    print(f"wrote {sum(len(v) for v in manifest['shards'].values())} shards to {args.out_dir}: "
          + ", ".join(f"{s} {totals[s]['documents']} documents / {totals[s]['tokens']} tokens" for s in SPLITS)
          + f" ({manifest['tokenizer']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
