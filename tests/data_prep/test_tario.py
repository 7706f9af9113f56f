import pytest
from data_files import save_image

from arr_coc.errors import DataError
from data_prep.tario import decode_image, decode_sample, iter_shard


@pytest.mark.parametrize(("mode", "fmt"), [("CMYK", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"),
                                           ("I;16", "PNG"), ("RGB", "PNG")])
def test_images_decode_to_rgb(tmp_path, mode, fmt):
    path = save_image(tmp_path / f"x.{fmt.lower()}", mode=mode, fmt=fmt)
    image = decode_image(path.read_bytes())
    assert image.mode == "RGB" and image.size == (64, 48)
    if mode == "I;16":  # 16-bit values are scaled, not clipped to white
        assert image.getpixel((0, 0))[0] < 10


def test_unreadable_shards_and_samples_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.tar: shard file not found"):
        list(iter_shard(tmp_path / "nope.tar"))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x01" * 700)
    with pytest.raises(DataError, match="bad.tar: truncated or corrupt shard"):
        list(iter_shard(bad))
    raw = {"__key__": "k1", "__url__": "s.tar", "jpg": b"garbage", "json": b"{}"}
    with pytest.raises(DataError, match="s.tar: sample 'k1': undecodable image"):
        decode_sample(raw)
    save_image(tmp_path / "ok.png", fmt="PNG")
    raw = {"__key__": "k2", "__url__": "s.tar", "png": (tmp_path / "ok.png").read_bytes(), "json": b"{oops"}
    with pytest.raises(DataError, match="s.tar: sample 'k2' has no valid json"):
        decode_sample(raw)


def test_shard_cut_at_a_member_boundary_is_reported(tmp_path):
    import tarfile

    import webdataset as wds

    shard = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(shard)) as writer:
        for i in range(3):
            writer.write({"__key__": f"s{i}", "json": b'{"i": %d}' % i, "txt": b"x" * 700})
    assert len(list(iter_shard(shard))) == 3  # the whole shard reads
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    boundary = members[2].offset  # header of the second sample's first file: a clean cut
    shard.write_bytes(shard.read_bytes()[:boundary])
    with pytest.raises(DataError, match="train-000000.tar: truncated or corrupt shard"):
        list(iter_shard(shard))
