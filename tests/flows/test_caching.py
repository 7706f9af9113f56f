from arr_coc.config import load_config
from flows.caching import hash_tree, stage_fingerprint


def test_hash_tree_follows_content_and_names(tmp_path):
    art = tmp_path / "artifact"
    (art / "adapter").mkdir(parents=True)
    (art / "allocator.safetensors").write_bytes(b"weights")
    (art / "adapter" / "a.safetensors").write_bytes(b"lora")
    first = hash_tree(art)
    assert hash_tree(art) == first
    (tmp_path / "unrelated.txt").write_text("x")
    assert hash_tree(art) == first
    (art / "adapter" / "a.safetensors").write_bytes(b"lora2")
    assert hash_tree(art) != first
    (art / "adapter" / "a.safetensors").write_bytes(b"lora")
    assert hash_tree(art) == first
    (art / "adapter" / "a.safetensors").rename(art / "adapter" / "b.safetensors")
    assert hash_tree(art) != first
    assert hash_tree(None) == "none"


def test_stage_fingerprint_covers_own_section_and_shared_settings_only():
    base = load_config(None)
    fp = stage_fingerprint(base, "stage1")
    assert stage_fingerprint(load_config(None, ["run.name=other", "run.root=/elsewhere"]), "stage1") == fp
    assert stage_fingerprint(load_config(None, ["launcher.num_gpus=8"]), "stage1") == fp
    assert stage_fingerprint(load_config(None, ["stages.stage2.lr=0.5"]), "stage1") == fp
    assert stage_fingerprint(load_config(None, ["stages.stage1.lr=0.5"]), "stage1") != fp
    assert stage_fingerprint(load_config(None, ["seed=7"]), "stage1") != fp
    assert stage_fingerprint(load_config(None, ["data.images=50"]), "stage1") != fp
    assert stage_fingerprint(base, "stage2") != fp
