import json

from flows.report import format_table, pick, write_report


def test_pick_prefers_held_out_names_and_skips_nan():
    metrics = {"train/iou": 0.1, "val/iou": 0.4, "val/accuracy": float("nan"), "accuracy": 0.7, "flag": True}
    assert pick(metrics, ("val/iou", "iou")) == 0.4
    assert pick(metrics, ("val/acc", "acc")) == 0.7
    assert pick(metrics, ("tokens_kept",)) is None
    assert pick({"flag": True}, ("flag",)) is None


def test_write_report_table_and_heatmaps(tmp_path):
    art = tmp_path / "stage1" / "artifact"
    (art / "heatmaps").mkdir(parents=True)
    (art / "heatmaps" / "0.png").write_bytes(b"png")
    rows = [
        {"stage": "shard", "status": "ready", "wall_s": 1.5, "metrics": {}},
        {"stage": "stage1", "status": "ran", "wall_s": 12.25, "metrics": {"val/iou": 0.5, "tokens_kept": 16}},
        {"stage": "stage2", "status": "cached", "wall_s": 3, "budget": 32, "metrics": {"vqa_accuracy": 0.25}},
    ]
    out = write_report(tmp_path / "report", rows, {"stage1": str(art)})
    lines = out["table"].splitlines()
    assert lines[0].split("|")[1].strip() == "stage"
    stage1 = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert stage1 == ["stage1", "ran", "12.25", "16", "0.5", "-", "-"]
    assert lines[2].split("|")[4].strip() == "-"
    stage2 = [c.strip() for c in lines[4].split("|")[1:-1]]
    assert stage2 == ["stage2", "cached", "3", "32", "-", "0.25", "-"]
    assert out["heatmaps"] == {"stage1": [str(art / "heatmaps" / "0.png")]}
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert saved["table"][1]["IoU"] == 0.5
    assert "0.png" in (tmp_path / "report" / "summary.md").read_text()
    assert format_table([]) == "(no stages)"
