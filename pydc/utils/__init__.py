"""Trainer utilities: atomic checkpoints and RNG state, JSON-lines logging, plots, torch.distributed helpers."""
