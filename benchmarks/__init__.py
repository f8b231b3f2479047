"""Benchmarks behind `lctk bench` and benchmarks/*.py: every timed figure is a ratio against a
baseline measured in the same run, or a count against a closed form (ARCHITECTURE.md, Tests and benchmarks).
They live in the checkout, not in the installed package.

Modules: measure (timing, peak memory, fresh processes), models (benchmark models, FLOPs),
prefill, parallel, deepspeed_peer, memory, needle, million, report (targets, the metric
table, plots), results (the measured block of RESULTS.md), suite (what `lctk bench` runs).
Scripts: run_all.py (everything, then RESULTS.md), million_tokens.py, pipeline_bubble.py,
gpu_check.sh / gpu_check.py, gpu_multirank.py. Rank groups: rank_group.py (the tests use them too).
"""
