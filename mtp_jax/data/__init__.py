"""Text in, token batches out.

sources.py   where documents come from (stdlib source, files, JSONL, prepared ArrayRecord shards)
tokenizer.py bytes or locally trained byte-level BPE, saved in a run's tokenizer/ folder
pipeline.py  packing into windows of seq_len + mtp_heads tokens, Grain iterators, eval batches
prepare.py   `mtp-prepare`: tokenize a corpus once into ArrayRecord shards
"""
