"""Recipes (thin Hydra entry points and YAML) of the BuPO plugin."""
