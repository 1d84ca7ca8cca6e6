"""Benchmarks: throughput, memory and MFU vs context length (`pha-lab bench`), the GPT-2 reference loop,
and the Lightning-vs-plain-loop overhead check. See docs/perf-notes.md."""
