"""The public API composed of the stages: ``analyze``, ``statistics`` (analyze.py), ``compress``."""
