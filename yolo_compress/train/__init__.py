"""Training and distillation: the one Ultralytics trainer seam, training runs, the teacher losses."""
