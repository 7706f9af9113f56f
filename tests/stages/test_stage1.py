"""Stage 1 proxy IoU: the allocator learns where the queried object is (held-out data)."""

from __future__ import annotations

import json

import pytest
import torch
from curriculum_run import STAGE_SETTINGS, K, artifact, fresh_task
from PIL import Image
from safetensors.torch import load_file

from arr_coc.layer import ARRCOCLayer
from stages.common import read_lineage


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "curriculum"


@pytest.mark.integration
def test_stage1_beats_baselines_on_held_out_iou(root):
    art = artifact(root, "stage1")
    metrics = json.loads((art / "metrics.json").read_text())
    assert metrics["eval_queries"] >= 32
    # K = N/4 of the 8x8 grid; the metrics are on validation images the allocator never saw.
    assert metrics["steps"] == STAGE_SETTINGS["stage1"]["max_steps"]
    for baseline in ("random", "centre", "untrained"):
        assert metrics["iou"] > metrics[f"iou_{baseline}"], (baseline, metrics)
        assert metrics["recall"] > metrics[f"recall_{baseline}"], (baseline, metrics)


@pytest.mark.integration
def test_stage1_artifact_loads_with_safetensors(root):
    art = artifact(root, "stage1")
    state = load_file(str(art / "allocator.safetensors"))
    task = fresh_task(root, "stage1")
    hidden = 64  # the tiny text hidden size: vision_dim = query_dim
    layer = ARRCOCLayer(task.ctx.cfg.allocator, vision_dim=hidden, query_dim=hidden)
    layer.load_state_dict(state, strict=True)
    assert read_lineage(art)["base"] == "tiny-pretrained"  # a model name, as a hub id would be
    heatmaps = sorted((art / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 4
    assert Image.open(heatmaps[0]).size == (256, 256)
    assert task.ctx.stage.budget == K


@pytest.mark.integration
def test_stage1_trains_only_the_allocator(root):
    task = fresh_task(root, "stage1")
    model = task.build_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("allocator.") for n in trainable)
    batch = next(iter(task.train_loader()))
    loss, logs = task.training_step(model, batch)
    loss.backward()
    assert logs["tokens_kept"] == K and 0.0 < logs["soft_iou_loss"] <= 1.0
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("allocator.") for n in grads)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert all(item["query"] == f"find the {item['category']}." for item in batch)
    assert torch.isfinite(loss)
