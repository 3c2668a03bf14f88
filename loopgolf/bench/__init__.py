"""Benchmarks and fuzzers that ship with the package: measured runs, not tests.

``train`` (``loopgolf bench train``: tokens/s, step time, memory and MFU of the training step),
``serve`` (``loopgolf bench serve``: the serving engines side by side, early exit's bpb cost and
a server load test) and ``fuzz_artifact`` (mutated artifacts against the bounded loader; the
tests run a short round of it). Scripts that only regenerate documentation tables live in the
repository's ``scripts/`` folder instead.
"""
