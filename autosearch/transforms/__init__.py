"""Model transforms: structured pruning, low-rank factorization (torch and ONNX)."""
