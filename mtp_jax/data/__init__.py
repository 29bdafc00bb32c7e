"""Text in, token batches out.

sources.py   where documents come from (stdlib source, files, JSONL)
tokenizer.py bytes or locally trained byte-level BPE, saved in a run's tokenizer/ folder
store.py     the prepared token store: chunked TensorStore arrays per split, read by window
build.py     writing that store in bounded memory: parts, worker processes, merge
prepare.py   `mtp-prepare`: one machine or many (--tokenizer-only, --shard I/N, --merge)
pipeline.py  packing into windows of seq_len + mtp_heads tokens, Grain iterators, eval batches
"""
