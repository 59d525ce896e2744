#!/usr/bin/env python
"""
Prepare the ADE20K download (ADEChallengeData2016) for Detectron2's ade20k_sem_seg_train / _val:
write annotations_detectron2/{training,validation}/*.png from annotations/{training,validation}/*.png,
label 0 (other) -> 255 (ignored), k -> k - 1.

    python tools/prepare_ade20k.py SRC [DST]

SRC is the ADEChallengeData2016 folder as downloaded (images/ and annotations/). DST, by default SRC, is
the folder Detectron2 reads as $DETECTRON2_DATASETS/ADEChallengeData2016; a DST other than SRC gets
images/ as a link to SRC/images. Running it again skips the label maps already written.
"""
import argparse
import os
import sys

from denseclip.data.datasets.ade20k import prepare_ade20k


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("src", help="ADEChallengeData2016 as downloaded (images/, annotations/)")
    parser.add_argument("dst", nargs="?", default=None,
                        help="where annotations_detectron2/ is written (default: SRC); Detectron2 reads "
                             "$DETECTRON2_DATASETS/ADEChallengeData2016")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        counts = prepare_ade20k(args.src, args.dst, progress=not args.no_progress)
    except (OSError, ValueError) as e:
        raise SystemExit(f"prepare_ade20k.py: {e}")
    dst = os.path.abspath(os.path.expanduser(args.dst or args.src))
    for split, count in counts.items():
        out = os.path.join(dst, "annotations_detectron2", split)
        if count["converted"] == 0:
            print(f"{split}: all {count['skipped']} label maps already converted in {out}, nothing to do")
        else:
            skipped = f", skipped {count['skipped']} already converted" if count["skipped"] else ""
            print(f"{split}: converted {count['converted']} label maps into {out}{skipped}")
    parent = os.path.dirname(dst)
    if os.path.basename(dst) == "ADEChallengeData2016":
        print(f"Use it with DETECTRON2_DATASETS={parent}")
    else:
        print(f"Detectron2 reads $DETECTRON2_DATASETS/ADEChallengeData2016: make {dst} that folder "
              f"(rename it or link it there)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
