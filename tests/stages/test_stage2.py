"""Stage 2 LoRA VQA: accuracy at K = N/4 rises; adapters export and resume under ZeRO-3."""

from __future__ import annotations

import json

import pytest
import torch
from curriculum_run import K, artifact, config, start_metrics
from safetensors.torch import load_file

from stages.common import build_vlm, read_lineage
from stages.stage2 import ADAPTER_DIR, load_lora


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "curriculum"


@pytest.mark.integration
def test_stage2_accuracy_at_quarter_budget_rises_over_its_start(root):
    artifact(root, "stage1")
    start = start_metrics(root, "stage2")  # stage-1 allocator, fresh (zero) adapters, same seed
    final = json.loads((artifact(root, "stage2") / "metrics.json").read_text())
    assert final["budget"] == start["budget"] == K
    assert final["eval_samples"] == start["eval_samples"] == 600  # the same held-out questions
    assert final["vqa_accuracy"] > start["vqa_accuracy"], (start, final)
    assert final["answer_loss"] < start["answer_loss"], (start, final)


@pytest.mark.integration
def test_stage2_adapter_artifact(root):
    art = artifact(root, "stage2")
    adapter = load_file(str(art / ADAPTER_DIR / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key and "language_model" in key for key in adapter)
    assert not any("visual" in key for key in adapter)
    lora_b = [t for key, t in adapter.items() if "lora_B" in key]
    assert lora_b and all(t.numel() > 0 for t in adapter.values())
    assert any(t.abs().sum() > 0 for t in lora_b)  # trained away from peft's zero init
    assert read_lineage(art)["init_from"] == str((root / "tiny" / "stage1" / "artifact").resolve())

    # The adapters load back (peft, safetensors) with exactly the exported values.
    from stages.runner import make_context

    ctx = make_context("stage2", config(root), None, 0, 1)
    model, _ = build_vlm(ctx, read_lineage(art)["base"])
    load_lora(model, art)
    loaded = {n: p for n, p in model.vlm.named_parameters() if "lora_" in n}
    assert len(loaded) == len(adapter)
    for name, value in adapter.items():
        match = [
            p for n, p in loaded.items() if n.replace(".default", "").endswith(name.split("base_model.")[-1])
        ]
        assert len(match) == 1 and torch.equal(match[0].detach(), value), name


def _zero3_run(root, run_name: str, stage1_artifact, monkeypatch, fail_at: str | None = None):
    from stages.runner import run_stage

    cfg = config(
        root,
        [
            f"run.name={run_name}",
            "data.images=40",
            "stages.stage2.zero_stage=3",
            "stages.stage2.max_steps=3",
            "stages.stage2.checkpoint_every=2",
            "stages.stage2.eval_samples=4",
            "stages.stage2.lr=5e-3",
            f"stages.stage2.budget={K}",
        ],
    )
    if fail_at:
        monkeypatch.setenv("ARR_COC_FAIL_AT", fail_at)
        with pytest.raises(RuntimeError, match="injected fault"):
            run_stage("stage2", cfg, init_from=stage1_artifact, resume=True)
        monkeypatch.delenv("ARR_COC_FAIL_AT")
    return run_stage("stage2", cfg, init_from=stage1_artifact, resume=True)


@pytest.mark.integration
def test_stage2_adapters_survive_zero3_checkpoint_and_resume(root, monkeypatch):
    """Under ZeRO-3 every parameter is partitioned: a naive export writes empty adapters and
    a checkpoint without them resumes from zero adapters. Stop after step 2 (its checkpoint
    committed), resume, and the final adapters must equal an uninterrupted run's bitwise."""
    stage1 = artifact(root, "stage1")
    straight = _zero3_run(root, "zero3-straight", stage1, monkeypatch)
    resumed = _zero3_run(root, "zero3-resumed", stage1, monkeypatch, fail_at="stage2:step2")
    assert (resumed.parent / "checkpoints" / "step-2").is_dir()
    for name in ("allocator.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and a
        for key in a:
            assert a[key].numel() > 0, key
            assert torch.equal(a[key], b[key]), (name, key)
    adapter = load_file(str(straight / ADAPTER_DIR / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
