"""ee-lightning: early-exit inference for transformer language models (ConsistentEE and baselines)."""

__version__ = "0.1.0"
