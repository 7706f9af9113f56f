"""Tests of data_prep/cli.py (named apart from tests/stages/test_cli.py: pytest needs unique basenames here)."""

import json

import pytest

from arr_coc.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_synth_shard_inspect_from_the_command_line(tmp_path, capsys):
    raw, coco, vqa = tmp_path / "raw", tmp_path / "coco", tmp_path / "vqa"
    code, out, _ = _run(capsys, "data", "synth", "--out", str(raw), "--images", "12", "--seed", "2",
                        "--image-size", "64")
    assert code == 0 and "train: 10 images" in out
    code, out, _ = _run(capsys, "shard", "coco", "--annotations", str(raw / "instances_train.json"),
                        "--images", str(raw / "images"), "--out", str(coco), "--shard-size", "4", "--workers", "2",
                        "--no-progress")
    assert code == 0 and "train: 3 shards (3 written, 0 kept), 10 samples" in out
    code, out, _ = _run(capsys, "shard", "vqav2", "--questions", str(raw / "questions_val.json"),
                        "--annotations", str(raw / "annotations_val.json"), "--images", str(raw / "images"),
                        "--out", str(vqa), "--no-progress")
    assert code == 0 and out.startswith("val: 1 shards")
    code, out, _ = _run(capsys, "shard", "inspect", str(coco))
    assert code == 0 and "train: 3 shards, 10 samples, 0 skipped, complete" in out

    shard = coco / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    code, out, err = _run(capsys, "shard", "inspect", str(coco))
    assert code == 1 and err.startswith("error: ") and "train-000001.tar: damaged" in err
    assert len(err.strip().splitlines()) == 1


def test_max_bad_fraction_exits_1_with_counts(tmp_path, capsys):
    raw = tmp_path / "raw"
    _run(capsys, "data", "synth", "--out", str(raw), "--images", "10", "--image-size", "64")
    coco = json.loads((raw / "instances_train.json").read_text())
    for image in coco["images"][:3]:
        (raw / "images" / image["file_name"]).unlink()
    code, _, err = _run(capsys, "shard", "coco", "--annotations", str(raw / "instances_train.json"),
                        "--images", str(raw / "images"), "--out", str(tmp_path / "s"), "--no-progress",
                        "--max-bad-fraction", "0.01")
    records = len(coco["images"]) + len(coco["annotations"])
    assert code == 1 and f"3 of {records} records skipped" in err and "max-bad-fraction 1.0%" in err


@pytest.mark.parametrize("argv", [["shard", "coco", "--annotations", "a.json", "--images", "i", "--out", "o",
                                   "--shard-size", "0"],
                                  ["data", "synth", "--out", "o", "--images", "1"],
                                  ["shard", "coco", "--images", "i", "--out", "o"]])
def test_usage_errors_exit_2(argv, capsys):
    code, _, err = _run(capsys, *argv)
    assert code == 2 and err.startswith("error: ")


def test_missing_annotation_file_is_a_one_line_error(tmp_path, capsys):
    code, _, err = _run(capsys, "shard", "coco", "--annotations", str(tmp_path / "instances_val2017.json"),
                        "--images", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 1 and err.strip() == f"error: {tmp_path / 'instances_val2017.json'}: file not found"


@pytest.mark.parametrize("argv", [["data", "synth"], ["shard", "coco"], ["shard", "vqav2"], ["shard", "hf"],
                                  ["shard", "inspect"]])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out
