"""DeepSpeed configs: every "auto" filled from the stage config; a real engine on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arr_coc.config import load_config
from arr_coc.errors import ConfigError
from stages import engine
from stages.engine import CONFIG_DIR, resolve_deepspeed_config

SETS = [
    "stages.stage1.batch_size=3",
    "stages.stage1.grad_accum=5",
    "stages.stage1.grad_clip=0.7",
    "stages.stage1.lr=0.002",
    "stages.stage1.warmup_steps=4",
    "stages.stage1.max_steps=50",
]


def _autos(node, key=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _autos(v, f"{key}.{k}" if key else k)
    elif node == "auto":
        yield key


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.json")))
def test_every_auto_is_filled_from_the_stage(name):
    assert list(_autos(json.loads((CONFIG_DIR / name).read_text())))  # the file does use "auto"
    cfg = load_config(None, [*SETS, f"stages.stage1.deepspeed_config={name}", "stages.stage1.zero_stage=3"])
    ds = resolve_deepspeed_config(cfg, "stage1")
    assert list(_autos(ds)) == []
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.7
    assert ds["optimizer"]["params"]["lr"] == 0.002
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 4
    assert ds["scheduler"]["params"]["warmup_min_ratio"] == pytest.approx(1 / 5)
    assert ds["scheduler"]["params"]["total_num_steps"] == 50
    assert ds["bf16"]["enabled"] is False  # CPU: fp32
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_optimization"]["stage"] == 3
    for part in ("offload_optimizer", "offload_param"):
        if part in ds["zero_optimization"]:
            assert ds["zero_optimization"][part]["device"] == "none"


def test_gpu_choices(monkeypatch):
    monkeypatch.setattr(engine, "cuda_available", lambda: True)
    cfg = load_config(
        None, ["stages.stage2.deepspeed_config=zero3_offload.json", "stages.stage2.zero_stage=3"]
    )
    ds = resolve_deepspeed_config(cfg, "stage2")
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["torch_adam"] is False
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_zero_stage_picks_default_file():
    cfg = load_config(None, ["stages.stage1.zero_stage=3"])
    assert resolve_deepspeed_config(cfg, "stage1")["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"
    ]
    cfg = load_config(None, [])
    assert resolve_deepspeed_config(cfg, "stage1")["zero_optimization"]["stage"] == 2


def test_bad_config_files_name_file_and_key(tmp_path):
    cfg = load_config(None, ["stages.stage1.deepspeed_config=nope.json"])
    with pytest.raises(ConfigError, match="nope.json"):
        resolve_deepspeed_config(cfg, "stage1")
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps({"optimizer": {"params": {"momentum": "auto"}}}))
    cfg = load_config(None, [f"stages.stage1.deepspeed_config={custom}"])
    with pytest.raises(ConfigError, match=r"custom.json: optimizer.params.momentum"):
        resolve_deepspeed_config(cfg, "stage1")


ENGINE_SCRIPT = """
import torch
torch.set_num_threads(1)
from arr_coc.config import load_config
from stages.engine import build_engine, init_distributed, resolve_deepspeed_config
cfg = load_config(None, ["stages.stage1.max_steps=6", "stages.stage1.warmup_steps=2",
                         "stages.stage1.lr=0.01", "stages.stage1.grad_accum=2", "stages.stage1.grad_clip=0.5"])
init_distributed()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
model[0].requires_grad_(False)
eng = build_engine(model, resolve_deepspeed_config(cfg, "stage1"))
assert type(eng.optimizer.optimizer) is torch.optim.AdamW, type(eng.optimizer.optimizer)
assert len(eng.optimizer.optimizer.param_groups[0]["params"]) >= 1
assert eng.gradient_clipping() == 0.5 and eng.gradient_accumulation_steps() == 2
lrs, frozen = [], model[0].weight.detach().clone()
for micro in range(12):
    loss = eng(torch.randn(2, 4)).pow(2).mean() * 100
    eng.backward(loss)
    if micro % 2 == 1:
        lrs.append(eng.get_lr()[0])  # the rate this optimizer step applies
    eng.step()
lrs.append(eng.get_lr()[0])  # where the schedule ends
assert eng.global_steps == 6, eng.global_steps
assert torch.equal(frozen, model[0].weight)
print("LRS", lrs)
"""


@pytest.mark.integration
def test_real_engine_on_cpu_steps_at_accumulation_boundaries(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lrs = json.loads(result.stdout.split("LRS", 1)[1].strip())
    # DeepSpeed's first step runs at lr 0 ("not started"); then a linear ramp from
    # peak/(W+1) (W=2 warmup steps), then cosine down to cos_min_ratio * peak.
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(0.01 / 3) and lrs[2] == pytest.approx(0.02 / 3)
    assert max(lrs) <= 0.01 and lrs[-1] == pytest.approx(0.001)
    assert lrs[3:] == sorted(lrs[3:], reverse=True)
