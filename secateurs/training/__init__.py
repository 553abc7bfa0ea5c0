"""Training shared by every method that trains: sparse fine-tuning with distillation, gradual and
progressive pruning, quantization-aware recovery (see docs/training.md)."""
