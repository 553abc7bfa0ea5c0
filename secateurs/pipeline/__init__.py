"""The sequential layer-by-layer compression engine."""
