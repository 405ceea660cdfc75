"""Adapters that run creditrl methods inside other RL training libraries, one module per library."""
