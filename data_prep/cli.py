"""``arr-coc data synth`` and ``arr-coc shard coco|vqav2|hf|inspect``.

Heavy modules are imported inside the handlers so ``arr-coc --help`` stays fast.
Usage errors exit 2, data errors 1 (one ``error:`` line naming the file or record).
"""

from __future__ import annotations

import argparse
import json

from arr_coc.errors import ConfigError, DataError


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="synthetic data", description="Generate synthetic data.")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    data_sub.required = True
    synth = data_sub.add_parser("synth", help="synthetic scenes in COCO and VQAv2 formats",
                                description="Write shape scenes, COCO instances and VQAv2 question/annotation JSON.")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--images", type=int, default=240, help="number of images, train + val (default 240)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    synth.add_argument("--image-size", type=int, default=256, help="square image side in pixels (default 256)")
    synth.add_argument("--val-fraction", type=float, default=0.2, help="share of images in val (default 0.2)")
    synth.set_defaults(handler=_synth)

    shard = subparsers.add_parser("shard", help="write WebDataset shards", description="Write or inspect shards.")
    shard_sub = shard.add_subparsers(dest="shard_command", metavar="COMMAND")
    shard_sub.required = True
    coco = shard_sub.add_parser("coco", help="shard a COCO instances file",
                                description="One sample per image: the image and its boxes.")
    coco.add_argument("--annotations", required=True, help="COCO instances JSON (e.g. instances_train2017.json)")
    _common(coco)
    coco.set_defaults(handler=_shard_coco)
    vqa = shard_sub.add_parser("vqav2", help="shard VQAv2 questions and annotations",
                               description="One sample per question, joined to its annotation by question_id.")
    vqa.add_argument("--questions", required=True, help="VQAv2 questions JSON")
    vqa.add_argument("--annotations", help="VQAv2 annotations JSON (omit for test splits: no answers)")
    _common(vqa)
    vqa.set_defaults(handler=_shard_vqav2)
    hf = shard_sub.add_parser("hf", help="shard a saved Hugging Face datasets dataset",
                              description="A dataset from save_to_disk with image/question/answers columns.")
    hf.add_argument("--dataset", required=True, help="folder written by datasets' save_to_disk")
    hf.add_argument("--image-column", default="image")
    hf.add_argument("--question-column", default="question")
    hf.add_argument("--answers-column", default="answers")
    _common(hf, images=False)
    hf.set_defaults(handler=_shard_hf)
    inspect = shard_sub.add_parser("inspect", help="verify checksums and print counts",
                                   description="Re-hash and re-read every shard of DIR/manifest.json.")
    inspect.add_argument("dir", help="shard folder")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(handler=_inspect)


def _common(parser: argparse.ArgumentParser, images: bool = True) -> None:
    if images:
        parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--out", required=True, help="shard folder (holds {split}-NNNNNN.tar and manifest.json)")
    parser.add_argument("--split", help="split name (default: from the file name, else train)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="parallel writer processes (default 1)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05,
                        help="fail (exit 1) when more than this share of records is skipped (default 0.05)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _options(args) -> dict:
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1 (got {args.shard_size})")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {args.workers})")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise ConfigError(f"--max-bad-fraction must be in [0, 1] (got {args.max_bad_fraction})")
    return {"split": args.split, "shard_size": args.shard_size, "workers": args.workers,
            "max_bad_fraction": args.max_bad_fraction, "progress": not args.no_progress}


def _synth(args) -> int:
    from data_prep.synth import generate

    if args.images < 2:
        raise ConfigError(f"--images must be >= 2 (got {args.images})")
    if args.image_size < 32:
        raise ConfigError(f"--image-size must be >= 32 (got {args.image_size})")
    if not 0.0 < args.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1) (got {args.val_fraction})")
    summary = generate(args.out, images=args.images, seed=args.seed, image_size=args.image_size,
                       val_fraction=args.val_fraction)
    for split, info in summary["splits"].items():
        print(f"{split}: {info['images']} images, {info['objects']} objects, {info['questions']} questions")
    print(f"wrote {args.out}")
    return 0


def _report(summary: dict) -> int:
    boxes = summary["boxes"]
    print(f"{summary['split']}: {summary['shards']} shards ({summary['written']} written, {summary['kept']} kept), "
          f"{summary['samples']} samples, {summary['skipped']} of {summary['records']} records skipped, "
          f"boxes clipped {boxes['clipped']} dropped {boxes['dropped']} -> {summary['out']}/manifest.json")
    return 0


def _shard_coco(args) -> int:
    from data_prep.shard import shard_coco

    return _report(shard_coco(args.annotations, args.images, args.out, **_options(args)))


def _shard_vqav2(args) -> int:
    from data_prep.shard import shard_vqav2

    return _report(shard_vqav2(args.questions, args.annotations, args.images, args.out, **_options(args)))


def _shard_hf(args) -> int:
    from datasets import load_from_disk

    from data_prep.shard import shard_hf_dataset

    options = _options(args)
    options["split"] = options["split"] or "train"
    try:
        dataset = load_from_disk(args.dataset)
    except FileNotFoundError as err:
        raise DataError(f"{args.dataset}: not a saved dataset ({err})") from None
    return _report(shard_hf_dataset(dataset, args.out, image_column=args.image_column,
                                    question_column=args.question_column, answers_column=args.answers_column,
                                    **options))


def _inspect(args) -> int:
    from data_prep.shard import inspect

    report = inspect(args.dir)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for shard in report["shards"]:
            print(f"{shard['name']:<24} {shard['split']:<8} {shard['count']:>7}  {shard['status']}")
        for split, info in report["splits"].items():
            state = "complete" if info["complete"] else "INCOMPLETE"
            print(f"{split}: {info['shards']} shards, {info['samples']} samples, {info['skipped']} skipped, {state}")
    if not report["ok"]:
        raise DataError(f"{args.dir}: {len(report['problems'])} problem(s): {'; '.join(report['problems'])}")
    return 0
