import pytest

from arr_coc.errors import ConfigError, DataError
from data_prep.loader import ShardLoader
from data_prep.masks import stage1_queries
from data_prep.shard import shard_coco, shard_urls


@pytest.fixture
def urls(synth_raw, tmp_path):
    """24 train images in 8 shards of 3."""
    shard_coco(synth_raw / "instances_train.json", synth_raw / "images", tmp_path, shard_size=3, progress=False)
    return shard_urls(tmp_path, "train")


def _keys(loader, batches):
    out = []
    for batch in loader:
        out.append([s["__key__"] for s in batch])
        if len(out) == batches:
            break
    return out


def _resume_check(urls, rank, world_size, num_workers, k, total, **kw):
    def make():
        return ShardLoader(urls, batch_size=2, rank=rank, world_size=world_size, num_workers=num_workers, seed=7,
                           shuffle_buffer=4, **kw)

    uninterrupted = _keys(make(), total)
    first = make()
    head = _keys(first, k)
    state = first.state_dict()
    restored = make()
    restored.load_state_dict(state)
    tail = _keys(restored, total - k)
    return uninterrupted, head + tail


@pytest.mark.integration
def test_exact_resume_two_ranks_two_workers(urls):
    """Interrupt after k batches (k odd: mid round-robin), restore into fresh loaders: same stream."""
    for rank in range(2):
        # 12 batches of 2 = 24 items per rank, twice its share of an epoch: crosses an epoch boundary.
        uninterrupted, resumed = _resume_check(urls, rank, 2, 2, k=5, total=12)
        assert resumed == uninterrupted
        flat = [key for batch in resumed for key in batch]
        assert len(flat) == 24


def test_exact_resume_without_worker_processes(urls):
    for k in (1, 4, 7):
        uninterrupted, resumed = _resume_check(urls, 0, 1, 0, k=k, total=16)
        assert resumed == uninterrupted


@pytest.mark.integration
def test_one_epoch_over_all_ranks_and_workers_sees_every_sample_once(urls):
    seen = []
    for rank in range(2):
        loader = ShardLoader(urls, batch_size=2, rank=rank, world_size=2, num_workers=2, seed=3, epochs=1)
        seen += [s["__key__"] for batch in loader for s in batch]
    assert len(seen) == 24 and len(set(seen)) == 24


def test_epochs_are_shuffled_deterministically(urls):
    def stream(seed):
        return [k for b in _keys(ShardLoader(urls, batch_size=4, seed=seed), 12) for k in b]

    a, b, c = stream(1), stream(1), stream(2)
    assert a == b and a != c
    assert sorted(a[:24]) == sorted(a[24:]) and a[:24] != a[24:]  # epoch 1 reorders epoch 0


def test_refuses_fewer_shards_than_ranks_times_workers(urls):
    with pytest.raises(ConfigError, match=r"8 shard\(s\) < 2 rank\(s\) x 5 worker\(s\)"):
        ShardLoader(urls, batch_size=2, rank=0, world_size=2, num_workers=5)
    with pytest.raises(ConfigError, match="rank 2 is outside world_size 2"):
        ShardLoader(urls, batch_size=2, rank=2, world_size=2)


def test_state_from_another_setup_is_refused(urls):
    state = ShardLoader(urls, batch_size=2, num_workers=0).state_dict()
    with pytest.raises(ConfigError, match="batch_size is 2, this loader has 3"):
        ShardLoader(urls, batch_size=3, num_workers=0).load_state_dict(state)


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.integration)])
def test_truncated_shard_raises_naming_it(urls, num_workers):
    victim = urls[5]
    with open(victim, "r+b") as f:
        f.truncate(len(open(victim, "rb").read()) // 2)
    loader = ShardLoader(urls, batch_size=4, num_workers=num_workers, shuffle=False)
    with pytest.raises(DataError) as err:
        for _ in loader:
            pass
    message = str(err.value)
    assert victim in message and "\n" not in message


def test_stage1_expansion_yields_one_query_per_category_and_resumes(urls):
    loader = ShardLoader(urls, batch_size=3, seed=0, epochs=1, expand=stage1_queries)
    samples = [s for batch in loader for s in batch]
    per_image = {}
    for s in samples:
        assert s["query"] == f"find the {s['category']}."
        assert any(o["category"] == s["category"] for o in s["json"]["objects"])
        per_image.setdefault(s["json"]["image_id"], []).append(s["category"])
    for categories in per_image.values():
        assert len(categories) == len(set(categories))
    assert len(samples) == sum(len(stage1_queries(s["json"])) for s in samples if s["__key__"].endswith("#0"))
    uninterrupted, resumed = _resume_check(urls, 0, 1, 0, k=3, total=9, expand=stage1_queries)
    assert resumed == uninterrupted
