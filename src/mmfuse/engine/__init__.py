"""Training and evaluation on Lightning: data for a run, the LightningModule, fit, evaluate, caches."""
