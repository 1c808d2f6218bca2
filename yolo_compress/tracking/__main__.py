"""`python -m yolo_compress.tracking upload`: see `yolo_compress.tracking.runs.main`."""

from yolo_compress.errors import stage_entrypoint
from yolo_compress.tracking.runs import main

stage_entrypoint(main)()
