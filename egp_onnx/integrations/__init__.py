"""Bridges to training frameworks (PyTorch, for finetuning between pruning steps)."""
