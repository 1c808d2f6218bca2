"""Pure functions over metrics dicts (no files, no MLflow)."""

from __future__ import annotations


def teacher_gap(teacher_val: dict[str, float], student_val: dict[str, float], min_gap: float) -> dict[str, float]:
    """How far the teacher is ahead of the student on val mAP50-95; `teacher_clearly_better` is 1 or 0."""
    gap = teacher_val["map50_95"] - student_val["map50_95"]
    return {"map50_95": gap, "teacher_clearly_better": int(gap >= min_gap)}
