"""The names attention's strategies answer to, torch-free so that toolkit.options (the one
declaration of every run option) and the planner can read them: how a sequence is cut across
ranks, and what travels around a ring."""

SEQUENCE_LAYOUTS = ("zigzag", "contiguous")  # attention.layout
RING_MODES = ("pass-kv", "pass-q", "auto")   # attention.ring; auto chooses per call
