"""The end-of-run summary: one row per stage, written as Markdown and JSON.

Stages name their metrics themselves (``val/iou``, ``val_accuracy``, ...); the table
picks, per column, the first metric whose name contains the column's keyword, so a
stage without that metric shows ``-`` rather than a made-up number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Column -> keywords looked for in metric names (first match wins; "held-out" names first).
COLUMNS = {
    "tokens kept": ("tokens_kept", "kept"),
    "IoU": ("val/iou", "val_iou", "eval/iou", "iou"),
    "accuracy": ("val/acc", "val_acc", "eval/acc", "accuracy", "acc"),
    "train loss": ("train_loss", "loss"),
}


def pick(metrics: dict[str, Any], keywords: tuple[str, ...]) -> float | None:
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for keyword in keywords:
        for key in sorted(numeric):
            if keyword in key.lower() and not math.isnan(float(numeric[key])):
                return float(numeric[key])
    return None


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.4g}"


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for row in rows:
        metrics = row.get("metrics", {})
        entry = {"stage": row["stage"], "status": row["status"], "wall s": row.get("wall_s")}
        entry.update({column: pick(metrics, keys) for column, keys in COLUMNS.items()})
        if entry["tokens kept"] is None:  # a fixed budget: K from the stage config
            entry["tokens kept"] = row.get("budget")
        table.append(entry)
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    """A fixed-width text table (also valid Markdown)."""
    if not table:
        return "(no stages)"
    headers = list(table[0])
    cells = [[str(r[h]) if h in ("stage", "status") else _fmt(r[h]) for h in headers] for r in table]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)


def heatmaps(artifacts: dict[str, str]) -> dict[str, list[str]]:
    found = {}
    for name, artifact in artifacts.items():
        pngs = sorted(str(p) for p in Path(artifact).rglob("*.png"))
        if pngs:
            found[name] = pngs
    return found


def write_report(out_dir: Path, rows: list[dict[str, Any]], artifacts: dict[str, str]) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary_rows(rows)
    maps = heatmaps(artifacts)
    text = format_table(table)
    md = ["# Curriculum summary", "", text, "", "## Heatmaps", ""]
    md += [f"- {name}: {path}" for name, paths in maps.items() for path in paths] or ["(none)"]
    (out_dir / "summary.md").write_text("\n".join(md) + "\n")
    data = {"stages": rows, "table": table, "heatmaps": maps}
    (out_dir / "summary.json").write_text(json.dumps(data, indent=2, default=str))
    return {
        "table": text,
        "heatmaps": maps,
        "files": [str(out_dir / "summary.md"), str(out_dir / "summary.json")],
    }
