"""Observability: metrics.jsonl, TensorBoard, the console progress bar, plots."""
