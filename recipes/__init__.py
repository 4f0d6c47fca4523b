"""Bundled pretraining recipes (YAML), installed as the package edgessl.recipes."""
