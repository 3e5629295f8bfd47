"""Experiment configs: one get_config() per file; variants import a base and change a few
fields."""
