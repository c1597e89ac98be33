"""LiDB weights: parametrisation, aux bases, targets and names, the LiDB file, LoRA export."""
