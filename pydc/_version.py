"""pydc's version: the one place it is written. setup.py reads it without importing pydc (which needs torch
and the compiled library); the build info and checkpoints record it."""

__version__ = "0.1.0"
