"""Prompt-learning methods on the frozen T5: one module per method (see docs/architecture.md)."""
