"""Benchmark scripts, run from the repository root as modules: `python -m benchmarks.compare --help`.

Every timing goes through `runtime.bench` (docs/design.md §6). `benchmarks.common` holds what the scripts
share (the lfm2-350m checkpoint, child processes, the protocol options); `benchmarks.peers` wraps the
peer engines as Sessions so they join the same interleaved rotation as ours.
"""
