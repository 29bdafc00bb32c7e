"""The text a completion adds to its prompt, exact for every tokenizer kind, checked the way code
evaluation uses it: each benchmark's reference solutions, fed as the ids that follow the prompt,
must come back as programs that pass (HumanEval 164 of 164, MBPP all but the known-broken).

The tokenizers are trained here: a SentencePiece model built like Llama's (BPE, byte fallback,
identity normalisation, whitespace kept, a dummy prefix, digits split) and a Hugging Face
byte-level BPE `tokenizer.json`, both on a few standard-library modules, in seconds."""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path

import numpy as np
import pytest

from mtp_jax.data.build import pack
from mtp_jax.data.tokenizer import ByteTokenizer, PretrainedTokenizer, completion_text, encode_prompt
from mtp_jax.evals.code import benchmarks
from mtp_jax.evals.code.sandbox import Sandbox


def stdlib_texts(count: int = 30) -> list[str]:
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:count]
    return [Path(f).read_text(errors="ignore") for f in files]


@pytest.fixture(scope="session")
def llama_spm(tmp_path_factory) -> PretrainedTokenizer:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(stdlib_texts()), model_writer=model, vocab_size=1000, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        max_sentence_length=1 << 20, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return PretrainedTokenizer(path)


@pytest.fixture(scope="session")
def hf_bpe(tmp_path_factory) -> PretrainedTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_texts(), trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return PretrainedTokenizer(path, "</s>", "<s>")


@pytest.fixture(params=["llama_spm", "hf_bpe", "bytes"])
def tokenizer(request):
    return ByteTokenizer() if request.param == "bytes" else request.getfixturevalue(request.param)


def bare_encoder(tok):
    """Encodes text that continues a sequence: a SentencePiece model without its dummy prefix (the
    space it adds belongs to a sequence's start only), the tokenizer itself otherwise."""
    if not str(getattr(tok, "path", "")).endswith(".model"):
        return tok.encode
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString()).encode


def continuation(tok, prompt: str, text: str) -> list[int]:
    """Ids a model would generate after encode(prompt) to write `text`: the tail of encoding both
    together where the prompt's ids are its head, else the text encoded as a continuation.
    Checked by decoding prompt + continuation in one piece, as a reader of the whole document would."""
    head, full = tok.encode(prompt), tok.encode(prompt + text)
    ids = full[len(head):] if full[: len(head)] == head else list(bare_encoder(tok)(text))
    assert tok.decode(head + ids) == prompt + text
    return ids


def test_llama_style_sentencepiece_drops_the_first_space_of_a_lone_completion(llama_spm):
    """Why decoding the completion alone is wrong: its first piece loses the dummy prefix's space."""
    prompt, body = "def f(x):\n", "    return x\n"
    ids = continuation(llama_spm, prompt, body)
    assert llama_spm.decode(ids) == body[1:]
    assert completion_text(llama_spm, encode_prompt(llama_spm, prompt), ids) == body


def test_completion_stops_at_the_end_token_and_keeps_split_characters(tokenizer):
    prompt = encode_prompt(tokenizer, "x = 'caf")
    ids = continuation(tokenizer, "x = 'caf", "\u00e9'\n")
    assert completion_text(tokenizer, prompt, [*ids, tokenizer.eot_id, *ids]) == "\u00e9'\n"
    if isinstance(tokenizer, ByteTokenizer):  # a character whose bytes straddle the boundary
        cut = tokenizer.encode("x = 'caf\u00e9")
        assert completion_text(tokenizer, cut[:-1], cut[-1:] + tokenizer.encode("'")) == "\u00e9'"


def test_document_convention_per_kind(llama_spm, hf_bpe):
    """Llama-style tokenizers open every document (prompts and packed training data) with <s>;
    bytes start bare. Every document ends with the end token, so segment ids follow the EOTs."""
    import sentencepiece
    from tokenizers import Tokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_spm.path))
    assert encode_prompt(llama_spm, "import os") == [sp.bos_id(), *sp.encode("import os")]
    hf = Tokenizer.from_file(str(hf_bpe.path))
    assert encode_prompt(hf_bpe, "import os") == [hf.token_to_id("<s>"), *hf.encode("import os").ids]
    assert encode_prompt(ByteTokenizer(), "ab") == [97, 98]
    docs = [np.array(llama_spm.encode(t), np.int32) for t in ("a = 1", "b = 2")]
    tokens, starts = pack(docs, llama_spm)
    want = [sp.bos_id(), *docs[0], sp.eos_id(), sp.bos_id(), *docs[1], sp.eos_id()]
    assert tokens.tolist() == want and starts.tolist() == [0, len(docs[0]) + 2]
    tokens, starts = pack([np.array([1, 2]), np.array([3])], ByteTokenizer())
    assert tokens.tolist() == [1, 2, 256, 3, 256] and starts.tolist() == [0, 3]


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox() as box:
        yield box


def references_through(tok, task: str, sandbox) -> dict:
    """task id -> (status, error type) of every reference solution that fails after the round trip
    prompt ids + continuation ids -> completion_text -> stop-string cut -> program."""
    problems = benchmarks.load(task)
    programs = []
    for p in problems:
        prompt = encode_prompt(tok, p.prompt)
        text = completion_text(tok, prompt, continuation(tok, p.prompt, p.reference) + [tok.eot_id])
        programs.append(p.program(benchmarks.cut(text, p.stops)))
    outcomes = sandbox.run_many(programs)
    return {p.task_id: (o.status, o.error_type) for p, o in zip(problems, outcomes) if o.status != "pass"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama_spm", "hf_bpe"])
def test_humaneval_canonical_solutions_pass_through_the_tokenizer(kind, request, sandbox):
    assert references_through(request.getfixturevalue(kind), "humaneval", sandbox) == {}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama_spm", "hf_bpe"])
def test_mbpp_reference_solutions_pass_through_the_tokenizer(kind, request, sandbox):
    failing = references_through(request.getfixturevalue(kind), "mbpp", sandbox)
    assert failing == {t: ("fail", "AssertionError") for t in benchmarks.MBPP_BROKEN_REFERENCES}
