"""The bottom layer: contracts (Features, Batch), errors, registries, masking helpers, atomic writes.

Nothing here imports another mmfuse package; every other layer may import from here.
"""
