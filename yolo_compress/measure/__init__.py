"""Measuring models: pycocotools scores, size and FLOPs, latency."""
