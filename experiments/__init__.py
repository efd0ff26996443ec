"""Thin entry points: train, benchmark, complexity. The logic lives in the cnnjax package."""
