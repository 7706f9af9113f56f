"""Hard mining: the stage-2 model scores the pool; hardest q% + flagged cases are sharded."""

from __future__ import annotations

import json
import math

import pytest
from curriculum_run import STAGE_SETTINGS, artifact

from stages.mine import HARD_SHARDS_DIR, HARD_TABLE_DIR, MineTask, select_hard, stratum_quotas


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "curriculum"


def test_select_hard_takes_top_fraction_by_loss_plus_flagged():
    losses = [0.1, 2.0, 0.5, 3.0, 0.2, 0.3]
    flagged = [False, False, False, False, True, False]
    by_loss, selected = select_hard(losses, flagged, 1 / 3)
    assert by_loss == [False, True, False, True, False, False]
    assert selected == [False, True, False, True, True, False]
    assert select_hard([1.0, 1.0, 1.0], [False] * 3, 0.5)[0] == [True, True, False]  # ties: pool order


def test_select_hard_takes_each_strata_share():
    losses = [0.1, 2.0, 0.5, 3.0, 0.2, 0.3]
    strata = ["yes", "yes", "yes", "yes", "no", "no"]
    by_loss, selected = select_hard(losses, [False] * 6, 0.5, strata)
    # Overall the top 3 would be 3.0, 2.0, 0.5 (all "yes"); per stratum: 2 of "yes", 1 of "no".
    assert by_loss == [False, True, False, True, False, True]
    assert selected == by_loss


def test_stratum_quotas_sum_to_the_overall_share():
    assert stratum_quotas([10, 5, 1], 0.3) == [3, 2, 0]  # 3 + 1.5 + 0.3 -> ceil(4.8) = 5
    assert stratum_quotas([1, 1, 1], 0.5) == [1, 1, 0]  # ties of the remainder: earlier stratum
    assert sum(stratum_quotas([7, 3, 9, 1], 0.25)) == 5


def test_mine_has_no_training_loop():
    assert MineTask.trains is False


@pytest.mark.integration
def test_mining_table_and_hard_shards(root):
    import datasets

    from data_prep.shard import inspect, read_manifest
    from stages.data import iter_samples

    art = artifact(root, "mine")
    metrics = json.loads((art / "metrics.json").read_text())
    table = datasets.load_from_disk(str(art / HARD_TABLE_DIR))
    split = list(iter_samples(root / "tiny" / "data" / "shards" / "vqav2", "train"))
    pool = split[: STAGE_SETTINGS["mine"]["pool_samples"]]  # the first questions in shard order
    assert len(split) > len(pool) == len(table) == metrics["pool_size"]
    assert table["question_id"] == [s["json"]["question_id"] for s in pool]  # every pool sample once
    assert all(loss > 0 for loss in table["loss"])
    assert set(table["accuracy"]) <= {0.0, 1 / 3, 2 / 3, 1.0}

    fraction = STAGE_SETTINGS["mine"]["hard_fraction"]
    assert sum(table["by_loss"]) == math.ceil(fraction * len(table))
    assert STAGE_SETTINGS["mine"]["hard_strata"] == "answer"
    strata = list(dict.fromkeys(table["answer"]))  # in pool order, as select_hard groups them
    quotas = dict(zip(strata, stratum_quotas([table["answer"].count(a) for a in strata], fraction)))
    for answer in strata:  # each answer's own top losses, its share of the hard set
        rows = [(loss, b) for loss, b, a in zip(table["loss"], table["by_loss"], table["answer"]) if a == answer]
        assert sum(b for _, b in rows) == quotas[answer]
        if quotas[answer]:
            threshold = min(loss for loss, b in rows if b)
            assert all(loss <= threshold for loss, b in rows if not b)
    assert table["flagged"] == [bool(s["json"].get("hard")) for s in pool]
    expected = [b or f for b, f in zip(table["by_loss"], table["flagged"])]
    assert table["selected"] == expected and metrics["hard_selected"] == sum(expected)
    # Hard cases are harder for the model than the rest of the pool.
    hard_loss = [loss for loss, s in zip(table["loss"], expected) if s]
    assert sum(hard_loss) / len(hard_loss) > metrics["pool_loss"]

    shards = art / HARD_SHARDS_DIR
    manifest = read_manifest(shards)
    assert manifest["totals"]["samples"] == sum(expected) and manifest["totals"]["skipped"] == 0
    report = inspect(shards)  # data_prep re-hashes and re-reads every shard
    assert report["ok"], report["problems"]
    assert report["splits"]["train"]["shards"] >= 8  # enough shards for 8 ranks x workers in stage 3
    sharded = sorted(s["json"]["question_id"] for s in iter_samples(shards, "train"))
    assert sharded == sorted(q for q, s in zip(table["question_id"], expected) if s)
    assert (art / "allocator.safetensors").is_file() and (
        art / "adapter" / "adapter_model.safetensors"
    ).is_file()
