"""Builders of data sets (the embedded synthetic set, AV-MNIST, avmnist-arith, a feature example).

They write ordinary manifests and files that the data pipeline reads; nothing in the pipeline
imports them.
"""
