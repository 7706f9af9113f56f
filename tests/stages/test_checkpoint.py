"""Committed checkpoints: the marker is written last, partial writes are ignored and pruned."""

from __future__ import annotations

import json
import random
import signal

import numpy as np
import pytest
import torch

from stages import checkpoint as ckpt


def _fake(root, step, committed=True):
    path = root / f"step-{step}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if committed:
        (path / ckpt.COMMIT_MARKER).write_text(json.dumps({"step": step}))
    return path


def test_latest_ignores_directories_without_marker(tmp_path):
    _fake(tmp_path, 2)
    _fake(tmp_path, 10)
    _fake(tmp_path, 12, committed=False)
    (tmp_path / "step-x").mkdir()
    assert [c.step for c in ckpt.committed(tmp_path)] == [2, 10]  # numeric, not lexical, order
    assert ckpt.latest(tmp_path).step == 10
    assert ckpt.latest(tmp_path / "missing") is None


def test_prune_keeps_newest_committed_and_drops_partial(tmp_path):
    for step in (2, 4, 6):
        _fake(tmp_path, step)
    _fake(tmp_path, 8, committed=False)
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6"]


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert random.random() == expected[0]
    assert float(np.random.rand()) == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_preserved_rng_restores_streams():
    torch.manual_seed(0)
    with ckpt.preserved_rng():
        torch.rand(5)
        random.random()
    after = torch.rand(2)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(2))


@pytest.mark.integration
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(toy, helpers):
    sets = ["stages.stage1.max_steps=6", "stages.stage1.checkpoint_every=2"]
    killed = toy.run("kill-in-write", sets, env={ckpt.KILL_IN_CHECKPOINT_ENV: "4"})
    assert killed.returncode == -signal.SIGKILL
    root = toy.stage_dir("kill-in-write") / "checkpoints"
    partial = root / "step-4"
    assert partial.is_dir() and any(partial.iterdir()) and not (partial / ckpt.COMMIT_MARKER).exists()
    assert ckpt.latest(root).step == 2

    resumed = helpers.check(toy.run("kill-in-write", sets))
    assert "(step 2)" in resumed.stdout  # the partial step-4 was not loaded
    assert [c.step for c in ckpt.committed(root)] == [4, 6]  # step 4 rewritten and committed
    weights = toy.weights("kill-in-write")
    assert set(weights) == {"allocator.0.weight", "allocator.0.bias", "head.weight", "head.bias"}


class _NotAWeight:
    """A global that ``weights_only`` unpickling must refuse."""


@pytest.mark.integration
def test_resume_reads_deepspeed_files_weights_only(toy, tmp_path):
    sets = ["stages.stage1.max_steps=2", "stages.stage1.checkpoint_every=2"]
    first = toy.run("tampered", sets)
    assert first.returncode == 0, first.stderr[-2000:]
    step = ckpt.latest(toy.stage_dir("tampered") / "checkpoints")
    model_file = next(step.path.glob("*model_states.pt"))
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    state["planted"] = _NotAWeight()  # what a doctored checkpoint could carry
    torch.save(state, model_file)
    resumed = toy.run("tampered", [*sets, "stages.stage1.max_steps=2"])
    assert resumed.returncode != 0
    assert "weights_only" in resumed.stderr or "Unsupported global" in resumed.stderr
