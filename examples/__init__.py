"""Runnable tutorials; each is a script (``python examples/<name>.py --quick``) whose
model builders the benchmarks import."""
