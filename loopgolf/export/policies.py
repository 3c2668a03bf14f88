"""Named quantization policies, as strings (parsed by :func:`loopgolf.export.quantize.parse_policy`).

A module of its own so that a preset can name a policy without loading the encoders."""

from __future__ import annotations

# The export of the Parameter Golf record (openai/parameter-golf PR #1855) in loopgolf's syntax:
# GPTQ int6 matrices and an int7 embedding, GPTQ'd too as the output layer (measured: it closed
# half to two thirds of the record recipe's quantization gap at 2 x 128), sigma clips per role, and LQER
# rank 4 on the 3 tensors with the largest errors, u at 2 bits and v at 4 bits in groups of 64
# (its LQER_ASYM layout). The record's int8 attention gates and its lrzip/ZPAQ coder have no
# counterpart here.
RECORD_POLICY = (
    "int6,embed=7,gptq,gptq_roles=embed+attn+mlp,clip=sigma,embed_sigmas=14,attn_sigmas=13,mlp_sigmas=11.5,"
    "lowrank=4,lowrank_roles=embed+attn+mlp,lqer_ubits=2,lqer_vbits=4,lqer_group=64,lqer_top=3,lqer_select=norm"
)
