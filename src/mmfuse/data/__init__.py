"""Data: manifests, per-modality preprocessing, datasets and collation, built-in data sets."""
