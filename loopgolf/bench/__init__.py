"""Benchmarks and fuzzers that ship with the package: measured runs, not tests.

``train`` (``loopgolf bench train``: tokens/s, step time, memory and MFU of the training step),
``serve`` (``loopgolf bench serve``: the serving engines side by side, early exit's bpb cost and
a server load test), ``fuzz_artifact`` (mutated artifacts against the bounded loader) and
``fuzz_server`` (malformed and extreme HTTP requests against ``loopgolf serve``, with concurrent
victim streams that must come through whole); the tests run a short round of each fuzzer. Scripts that only regenerate documentation tables live in the
repository's ``scripts/`` folder instead.
"""
