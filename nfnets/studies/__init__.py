"""Studies built on the library, not part of it: the AGC ablation sweep and its plots, signal propagation at
initialisation, and what they share (`sweeps`: result tables, releasing compiled programs between models)."""
