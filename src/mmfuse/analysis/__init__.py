"""Analysis of trained models: fusion-method benchmarks, robustness to missing/noisy modalities, importance."""
