"""The two training algorithms: DeepCluster (per-epoch k-means) and ODC (online memory)."""
