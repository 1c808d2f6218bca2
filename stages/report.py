"""Stage report: reports/summary.md and two plots, built only from the metrics and plots files.

    python stages/report.py --metrics-dir metrics --prune-plots plots/prune.json --out reports/summary.md \
        --pareto reports/pareto.png --prune-curve reports/prune_map_vs_gflops.png \
        --benchmark-notes reports/benchmark_notes.json --export-notes models/export/notes.json \
        --seed-grid reports/distill_comparison.md

The summary recommends the fastest shipped file whose test mAP50-95 is within `report.max_map_drop` of the
distilled model, and says why.

Missing optional inputs (benchmark, prune, student metrics) leave a note in the report; a missing evaluate folder is
an error. Same inputs, same bytes: nothing time- or machine-dependent is added here.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from yolo_compress import files
from yolo_compress.config import load_params, section_dict
from yolo_compress.errors import stage_entrypoint
from yolo_compress.ship.report import build_summary
from yolo_compress.ship.report_inputs import load_inputs
from yolo_compress.ship.report_plots import plot_pareto, plot_prune_curve
from yolo_compress.tracking.runs import log_artifact, log_artifacts_to_parent, stage_run

log = logging.getLogger("yolo_compress.ship.report")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics-dir", type=Path, required=True, help="folder with evaluate/, benchmark/, *.json")
    ap.add_argument("--prune-plots", type=Path, help="per-round prune records (JSON list)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--benchmark-notes", type=Path, default=Path("reports/benchmark_notes.json"),
                    help="the benchmark stage's strings: machine, per-row problems, flagged rows")
    ap.add_argument("--export-notes", type=Path, help="the export stage's per-model problems (notes.json)")
    ap.add_argument("--seed-grid", type=Path, help="compare_distill's committed table: the plain student's seed std")
    ap.add_argument("--out", type=Path, required=True, help="summary markdown")
    ap.add_argument("--pareto", type=Path, required=True, help="mAP vs latency plot (PNG)")
    ap.add_argument("--prune-curve", type=Path, required=True, help="mAP vs GFLOPs over prune rounds (PNG)")
    return ap.parse_args()


@stage_entrypoint
def main() -> None:
    args = parse_args()
    files.check_outputs([args.out, args.pareto, args.prune_curve])
    cfg = load_params(args.params).report
    inputs = load_inputs(args.metrics_dir, args.prune_plots, args.benchmark_notes, args.export_notes, args.seed_grid)
    for note in inputs.missing:
        log.warning("%s", note)
    files.write_text(args.out, build_summary(inputs, cfg.max_map_drop))
    plot_pareto(inputs, args.pareto)
    plot_prune_curve(inputs, args.prune_curve)
    outputs = [args.out, args.pareto, args.prune_curve]
    with stage_run("report", section_dict(cfg)):
        for path in outputs:
            log_artifact(str(path), artifact_path="report")
        parent = log_artifacts_to_parent(outputs, artifact_path="report")
        if parent:
            log.info("report also logged to the pipeline run %s", parent)
    log.info("wrote %s, %s, %s", *outputs)


if __name__ == "__main__":
    main()
