import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from arr_coc.cli import main
from arr_coc.config import RunConfig, save_config
from arr_coc.demo import _load
from arr_coc.qwen import ARRCOCQwen
from arr_coc.tiny import load_vlm, save_vlm


def test_synthetic_scene_heatmap(tmp_path, capsys):
    out = tmp_path / "heat.png"
    assert main(["demo", "--out", str(out), "--budget", "10"]) == 0
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (256, 256)
    printed = capsys.readouterr().out
    assert "kept 10/64 tokens" in printed and "question: where is the" in printed


def test_given_image_keeps_its_size(tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (200, 150), (40, 120, 200)).save(image)
    out = tmp_path / "sub" / "heat.png"
    assert main(["demo", "--image", str(image), "--question", "is there a blue circle?", "--out", str(out)]) == 0
    with Image.open(out) as png:
        assert png.size == (200, 150)


def test_missing_image_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert main(["demo", "--image", str(missing), "--question", "find the bar.", "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(missing) in err[0]
    assert not (tmp_path / "o.png").exists()


def _stage_artifacts(tmp_path):
    """A stage-0 export and a stage-1 artifact shaped as the stages write them."""
    cfg = RunConfig()
    stage0 = tmp_path / "run" / "stage0" / "artifact"
    hf_model, processor = load_vlm(cfg.model)
    save_vlm(hf_model, processor, stage0 / "base")
    (stage0 / "lineage.json").write_text(json.dumps({"base": "base", "init_from": None}))
    stage1 = tmp_path / "run" / "stage1" / "artifact"
    stage1.mkdir(parents=True)
    torch.manual_seed(123)
    allocator = ARRCOCQwen(hf_model, cfg.allocator).allocator
    state = {k: v.detach().clone().contiguous() for k, v in allocator.state_dict().items()}
    save_file(state, str(stage1 / "allocator.safetensors"))
    (stage1 / "lineage.json").write_text(json.dumps({"base": str(stage0 / "base"), "init_from": str(stage0)}))
    save_config(cfg.model_copy(update={"stages": cfg.stages.model_copy(
        update={"stage1": cfg.stages.stage1.model_copy(update={"budget": 12})})}), stage1 / "config.yaml")
    return hf_model, stage0, stage1, state


def test_artifact_loads_allocator_and_base(tmp_path, capsys):
    hf_model, _, stage1, state = _stage_artifacts(tmp_path)
    model, _, budget, _, notes = _load(stage1, None)
    assert budget == 12  # the stage-1 budget from the artifact's config
    loaded = model.allocator.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    base = model.vlm.state_dict()
    assert all(torch.equal(base[k], v) for k, v in hf_model.state_dict().items())
    assert any("allocator.safetensors" in note for note in notes)
    out = tmp_path / "heat.png"
    assert main(["demo", "--artifact", str(stage1), "--out", str(out)]) == 0
    assert "kept 12/64 tokens" in capsys.readouterr().out


def test_stage0_artifact_and_bad_artifacts(tmp_path, capsys):
    _, stage0, _, _ = _stage_artifacts(tmp_path)
    _, _, budget, _, notes = _load(stage0, None)
    assert budget is not None and any("untrained" in note for note in notes)
    not_artifact = tmp_path / "empty"
    not_artifact.mkdir()
    assert main(["demo", "--artifact", str(not_artifact), "--out", str(tmp_path / "o.png")]) == 1
    assert "lineage.json" in capsys.readouterr().err


@pytest.mark.integration
def test_demo_command_line_missing_image(tmp_path):
    """The real entry point: exit status 1 and one ``error:`` line naming the path (no traceback)."""
    out = tmp_path / "heat.png"
    done = subprocess.run([sys.executable, "-m", "arr_coc.cli", "demo", "--image", str(tmp_path / "x.png"),
                           "--question", "find the bar.", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error:") and "x.png" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
