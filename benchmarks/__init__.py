"""Side-by-side benchmarks for torchdyn-hypersolvers: ``python -m benchmarks [--quick] [--out DIR]``."""
