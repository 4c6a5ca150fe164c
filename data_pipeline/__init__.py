"""Kiln's data side: built-in sample, sources, cleaning, tokenizers, example builders, shards, loader.

`prepare.prepare(DataConfig, out_dir)` writes a data directory (docs/design.md); training ranks read it
with `loader.make_loader(...)`. Nothing is imported here, so a training worker that only needs the
loader does not pay for Ray's import.
"""
