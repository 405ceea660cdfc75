"""creditrl: reinforcement learning for LLM reasoners, built around *which tokens deserve the credit*."""

__version__ = "0.1.0"
