"""Unlabeled images for `distill.unlabeled`, made from the built-in digits data (issue 33 c: users have far more
images than labels).

    python -m yolo_compress.experiments.unlabeled_digits [--count 600] [--after 150] [--imgsz 160] [--seed 0]

Writes `--count` images, no labels, to `--out` (default data/sources/digits_unlabeled, git-ignored): train scenes
`--after`+1 onwards of the digits data with that seed and image side. They come from the train split's handwriting
pool and photo, like the labelled train images, but are none of them as long as `--after` is at least the run's
`data.train_images` (the labelled ones are scenes 1..train_images). data/sources/ is a dependency of `prepare`, so
the default pipeline reruns while the folder is there; move it out before a default `dvc repro`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from yolo_compress import files
from yolo_compress.config import DataConfig
from yolo_compress.data.real_scenes import write_digit_scenes
from yolo_compress.errors import UserError, stage_entrypoint

log = logging.getLogger("yolo_compress.experiments.unlabeled_digits")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=600, help="images to write (600: 4x the study's 150 labelled)")
    ap.add_argument("--after", type=int, default=150, help="skip the first train scenes: the labelled ones")
    ap.add_argument("--imgsz", type=int, default=160, help="image side: the run's data.image_size")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (it seeds the data)")
    ap.add_argument("--out", type=Path, default=Path("data/sources/digits_unlabeled"))
    return ap.parse_args(argv)


def write_unlabeled_digits(out: Path, count: int, after: int, imgsz: int, seed: int) -> None:
    """Train scenes after+1 .. after+count of the digits data, images only, into `out` (replaced whole)."""
    cfg = DataConfig(source="digits", image_size=imgsz, train_images=after + count, val_images=1, test_images=1,
                     test_shift_images=1)
    with files.atomic_dir(out) as tmp:
        write_digit_scenes(tmp / "scenes", cfg, seed)
        for image in sorted((tmp / "scenes" / "images" / "train").glob("*.png"))[after:]:
            image.rename(tmp / image.name)
        shutil.rmtree(tmp / "scenes")


@stage_entrypoint
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.count < 1:
        raise UserError(f"--count: expected an int >= 1, got {args.count}")
    if args.after < 0:
        raise UserError(f"--after: expected an int >= 0, got {args.after}")
    if not 64 <= args.imgsz <= 2048:
        raise UserError(f"--imgsz: expected an int in [64, 2048], got {args.imgsz}")
    log.info("drawing digits train scenes %d..%d at %d px, seed %d", args.after + 1, args.after + args.count,
             args.imgsz, args.seed)
    write_unlabeled_digits(args.out, args.count, args.after, args.imgsz, args.seed)
    print(f"written: {args.count} unlabeled images to {args.out}")


if __name__ == "__main__":
    main()
