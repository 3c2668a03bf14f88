"""Conversion of a trained full-depth transformer into a (Relaxed) Recursive Transformer.

- :mod:`loopgolf.sources.hf`: read a Hugging Face checkpoint on disk (config.json + safetensors;
  Llama family, GPT-2, Gemma) as an exact vanilla loopgolf model;
- :mod:`loopgolf.sources.load`: any source (a Hugging Face directory, a loopgolf run
  directory, a loopgolf artifact) as a vanilla loopgolf model;
- :mod:`loopgolf.convert.recursive`: tie the layers of a vanilla model into a CYCLE or SEQUENCE
  plan (Stepwise, Average, Lower, Upper, Random), with per-virtual-layer LoRA initialised by
  truncated SVD of what the tying lost.

Depends on model/ and train/; nothing in model/ depends on it.
"""
