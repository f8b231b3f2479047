"""Benchmarks behind `lctk bench` and benchmarks/: every timed figure is a ratio against a
baseline measured in the same run, or a count against a closed form (DESIGN.md section 7).

Modules: measure (timing, peak memory, fresh processes), ranks (gloo rank group),
models (benchmark models, FLOPs), prefill, parallel, deepspeed_peer, memory, needle,
million, report (targets, tables, plots), suite (what `lctk bench` runs).
"""
