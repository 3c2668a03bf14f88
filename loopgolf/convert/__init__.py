"""Conversion of a trained full-depth transformer into a (Relaxed) Recursive Transformer
(:mod:`loopgolf.convert.recursive`): tie the layers of a vanilla model into a CYCLE or SEQUENCE
plan (Stepwise, Average, Lower, Upper, Random), with per-virtual-layer LoRA initialised by
truncated SVD of what the tying lost. The models it starts from are read by
:mod:`loopgolf.sources` (Hugging Face directories, loopgolf runs and artifacts); the command is
:mod:`loopgolf.commands.convert`.
"""
