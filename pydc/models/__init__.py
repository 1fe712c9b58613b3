"""Backbones with the Sobel stem."""
