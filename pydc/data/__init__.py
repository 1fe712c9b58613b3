"""Data: image-folder indexing, DALI and torchvision loaders, bundled demo data."""
