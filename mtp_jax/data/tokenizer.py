"""Tokenizers: raw UTF-8 bytes, byte-level BPE trained locally (no downloads), or a pretrained
model's own (SentencePiece `tokenizer.model`, Hugging Face `tokenizer.json`) brought in by mtp-convert.

A run saves its tokenizer in `RUN_DIR/tokenizer/` so that evaluation and decoding turn ids back
into exactly the text the model was trained on. `tokenizer.json` there names the kind. The second
stage of the data layer: BPE trains on documents of the sources (sources.py) and nothing else;
preparation (build.py) encodes with what is made here.

Each kind has one document convention, used by packing, prompts and evaluation alike: a document
is [start token] + its ids + end token. Bytes and BPE have no start token (a document's first
token follows the previous document's end-of-text token and attends to nothing before it); a
pretrained tokenizer with a beginning-of-sequence token (Llama's `<s>`) opens every document with
it, as the model was trained and as Meta's generation code encodes prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np

from mtp_jax.atomic import write_json
from mtp_jax.config import ConfigError, DataConfig
from mtp_jax.data import sources

META_FILE = "tokenizer.json"
BPE_FILE = "bpe.json"
SPM_FILE = "tokenizer.model"
EOT_TEXT = "<|endoftext|>"
BPE_TRAIN_CHARS = 20_000_000  # data.bpe_train_chars default: more text barely changes the merges but costs minutes


class Tokenizer(Protocol):
    """What the pipeline, the trainer and decoding need from a tokenizer."""

    vocab_size: int
    eot_id: int  # ends every document
    bos_id: int | None  # opens every document (Llama's <s>); None: documents start bare
    name: str  # "bytes" or "bpe-<requested vocab size>": what the config asked for
    fingerprint: str  # changes with the vocabulary or merges: tells two bpe-32768 apart

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """int32 ids per text; the packing fast path (no Python int lists for megabytes of text)."""

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | Path) -> None: ...


def _write_meta(directory: str | Path, meta: dict) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / META_FILE, meta)
    return path


class ByteTokenizer:
    """Ids 0..255 are UTF-8 bytes and 256 is end-of-text: nothing to train, nothing out of vocabulary."""

    vocab_size = 257
    eot_id = 256
    bos_id = None
    name = fingerprint = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        _write_meta(directory, {"kind": "bytes", "name": self.name})


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) wrapping a Hugging Face `tokenizers.Tokenizer`."""

    bos_id = None

    def __init__(self, hf_tokenizer: Any, name: str):
        # The literal text "<|endoftext|>" inside a document stays text; only packing inserts EOT.
        hf_tokenizer.encode_special_tokens = True
        self._tok = hf_tokenizer
        self.name = name
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.eot_id = hf_tokenizer.token_to_id(EOT_TEXT)
        self.fingerprint = hashlib.sha1(hf_tokenizer.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        # Model vocabularies may be padded past the tokenizer's: such ids carry no text.
        keep = [int(i) for i in ids if 0 <= i < self.vocab_size and i != self.eot_id]
        return self._tok.decode(keep, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        path = _write_meta(directory, {"kind": "bpe", "name": self.name})
        self._tok.save(str(path / BPE_FILE))

    def export_hf(self, directory: Path) -> None:
        self._tok.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT_TEXT}))


class PretrainedTokenizer:
    """A converted checkpoint's tokenizer file, kept byte for byte: SentencePiece's `tokenizer.model`
    (Meta's Llama format) or Hugging Face's `tokenizer.json`. End of document is the model's EOS,
    start the model's BOS where it has one (SentencePiece's own; `bos_token` for tokenizer.json)."""

    name = "pretrained"

    def __init__(self, path: str | Path, eos_token: str | None = None, bos_token: str | None = None):
        self.path = Path(path)
        if self.path.suffix == ".model":
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
            self.vocab_size, self.eot_id = self._sp.get_piece_size(), self._sp.eos_id()
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self._encode = lambda texts: self._sp.encode(list(texts))
            self._decode = lambda ids: self._sp.decode(ids)
        else:
            from tokenizers import Tokenizer as HFTokenizer

            hf = HFTokenizer.from_file(str(self.path))
            self.vocab_size, self.eot_id = hf.get_vocab_size(), hf.token_to_id(eos_token or "</s>")
            if self.eot_id is None:
                raise ConfigError(f"tokenizer '{self.path}' has no end-of-text token {eos_token or '</s>'!r}; "
                                  "give its eos_token in tokenizer_config.json")
            self.bos_id = None if bos_token is None else hf.token_to_id(bos_token)
            if bos_token is not None and self.bos_id is None:
                raise ConfigError(f"tokenizer '{self.path}' has no beginning-of-text token {bos_token!r} "
                                  "(tokenizer_config.json's bos_token)")
            self._encode = lambda texts: [e.ids for e in hf.encode_batch(list(texts), add_special_tokens=False)]
            self._decode = lambda ids: hf.decode(ids, skip_special_tokens=True)
        self.eos_token, self.bos_token = eos_token, bos_token
        self.fingerprint = hashlib.sha1(self.path.read_bytes()).hexdigest()[:16]  # the file byte for byte

    def encode(self, text: str) -> list[int]:
        return list(self._encode([text])[0])

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._encode(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode([int(i) for i in ids if 0 <= i < self.vocab_size and i != self.eot_id])

    def save(self, directory: str | Path) -> None:
        # Not under its own name: a Hugging Face tokenizer.json would overwrite our META_FILE.
        file = "pretrained" + self.path.suffix
        path = _write_meta(directory, {"kind": "pretrained", "name": self.name, "file": file,
                                         "eos_token": self.eos_token, "bos_token": self.bos_token})
        if (path / file).resolve() != self.path.resolve():
            shutil.copyfile(self.path, path / file)

    def export_hf(self, directory: Path) -> None:
        """The file under its Hugging Face name (tokenizer.model or tokenizer.json)."""
        spm = self.path.suffix == ".model"
        shutil.copyfile(self.path, directory / (SPM_FILE if spm else "tokenizer.json"))
        config = ({"tokenizer_class": "LlamaTokenizer", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}
                  if spm else {"eos_token": self.eos_token, "bos_token": self.bos_token})
        (directory / "tokenizer_config.json").write_text(json.dumps(config))


def document_start(tokenizer: Tokenizer) -> list[int]:
    """The ids that open every document: [BOS] where the tokenizer has one, else none."""
    return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt as the start of a document, as packing lays documents out for training."""
    return document_start(tokenizer) + tokenizer.encode(text)


def completion_text(tokenizer: Tokenizer, prompt: Sequence[int], completion: Iterable[int]) -> str:
    """The text that follows the prompt, cut at the first end-of-document token.

    Decoding the completion alone is wrong for SentencePiece (a sequence's first piece loses the
    space of its dummy prefix: an indented line comes out one space short) and for multi-byte
    characters split at the boundary, so prompt + completion are decoded together and the prompt's
    own text taken off the front; where a decoder rewrites text across the boundary, what the two
    decodings share is taken off."""
    ids = list(completion)
    ids = ids[: ids.index(tokenizer.eot_id)] if tokenizer.eot_id in ids else ids
    head, full = tokenizer.decode(prompt), tokenizer.decode([*prompt, *ids])
    shared = len(head) if full.startswith(head) else len(os.path.commonprefix([head, full]))
    return full[shared:]


def train_bpe(texts: Iterable[str], vocab_size: int, max_chars: int = BPE_TRAIN_CHARS) -> BPETokenizer:
    """Trains byte-level BPE on the texts (at most max_chars of them, in order)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 257:
        raise ConfigError(f"data.bpe_vocab_size={vocab_size} leaves no room for merges; use e.g. 4096 (or data.tokenizer=bytes)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(capped(texts, max_chars), trainer=trainer)
    return BPETokenizer(hf, f"bpe-{vocab_size}")


def capped(texts: Iterable[str], max_chars: int) -> Iterable[str]:
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        total += len(text)
        yield text


def expected_name(data_cfg: DataConfig) -> str:
    """The tokenizer name a config asks for, to catch a run directory holding a different one."""
    return data_cfg.tokenizer if data_cfg.tokenizer in ("bytes", "pretrained") else f"bpe-{data_cfg.bpe_vocab_size}"


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Reads what `save` wrote."""
    path = Path(directory)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ConfigError(f"'{path}' holds no tokenizer ({META_FILE} missing); point at a run's or mtp-prepare's tokenizer/ folder")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") == "bytes":
        return ByteTokenizer()
    if meta.get("kind") == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_file(str(path / BPE_FILE)), meta["name"])
    if meta.get("kind") == "pretrained":
        return PretrainedTokenizer(path / meta["file"], meta.get("eos_token"), meta.get("bos_token"))
    raise ConfigError(f"'{meta_path}' names an unknown tokenizer kind {meta.get('kind')!r}; expected bytes, bpe or pretrained")


def sample_texts(data_cfg: DataConfig, parts: list[sources.Files]) -> Iterator[str]:
    """Train-split texts for BPE: an equal share of data.bpe_train_chars from the start of every
    part (with one part, simply the first characters in sorted order)."""
    share = max(1, data_cfg.bpe_train_chars // len(parts))
    for files in parts:
        yield from capped((d.text for d in sources.documents(data_cfg, files) if d.split == "train"), share)


def make_tokenizer(data_cfg: DataConfig, parts: list[sources.Files]) -> Tokenizer:
    """The tokenizer a preparation of `parts` encodes with: bytes, or BPE trained on their sample."""
    if data_cfg.tokenizer == "bytes":
        return ByteTokenizer()
    return train_bpe(sample_texts(data_cfg, parts), data_cfg.bpe_vocab_size, data_cfg.bpe_train_chars)


def build_tokenizer(data_cfg: DataConfig, run_dir: str | Path) -> Tokenizer:
    """The run's tokenizer: loaded from RUN_DIR/tokenizer/ if there, else made and saved there.

    Prepared data brings the tokenizer that encoded it; BPE trains on a bounded sample of the
    train split (data.bpe_train_chars).
    """
    folder = Path(run_dir) / "tokenizer"
    if (folder / META_FILE).is_file():
        tokenizer = load_tokenizer(folder)
    elif data_cfg.source == "prepared":
        tokenizer = load_tokenizer(Path(data_cfg.path) / "tokenizer")
    elif data_cfg.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    else:
        tokenizer = make_tokenizer(data_cfg, sources.on_the_fly_parts(data_cfg))
    if tokenizer.name != expected_name(data_cfg):
        raise ConfigError(
            f"the tokenizer for {run_dir} is '{tokenizer.name}' but the config asks for '{expected_name(data_cfg)}'; "
            "set data.tokenizer/data.bpe_vocab_size to match or use a new directory"
        )
    if not (folder / META_FILE).is_file():
        tokenizer.save(folder)
    return tokenizer
