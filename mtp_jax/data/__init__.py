"""Text in, token batches out, in four stages; each imports only the stages before it.

sources.py   documents: the standard library, files, JSONL, or a generated task (generated.py)
tokenizer.py bytes, locally trained byte-level BPE (on documents of sources.py) or a pretrained one,
             saved in a run's tokenizer/ folder
build.py     the prepared token store, written in bounded memory (parts, worker processes, merge),
             and the one a run reads: mtp-prepare's OUT_DIR or the run's on-the-fly cache
store.py     that store's format: chunked TensorStore arrays per split, read by window
pipeline.py  windows of seq_len + mtp_heads tokens read from a given store, Grain iterators, eval batches
prepare.py   `mtp-prepare`: one machine or many (--tokenizer-only, --shard I/N, --merge)
"""
