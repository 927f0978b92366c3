import json
import os
import threading
import time
import uuid

import pytest
from PIL import Image

from sdxl_bento.core.images import ImageStore, StoredImage, SweepStats, encode, infotext, read_parameters
from sdxl_bento.errors import InvalidRequest, NotFound


def test_infotext_follows_the_a1111_layout():
    text = infotext("a cat, photo", "blurry", {"Steps": 30, "Sampler": "Euler a", "Seed": 42, "Model": "sdxl-base:v1"})
    assert text == 'a cat, photo\nNegative prompt: blurry\nSteps: 30, Sampler: Euler a, Seed: 42, Model: "sdxl-base:v1"'


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_parameters_are_embedded_and_read_back(fmt, magic):
    image = Image.new("RGB", (64, 48), (200, 10, 10))
    text = infotext("ünïcode prompt", "", {"Seed": 7})
    data = encode(image, fmt, 90, text)
    assert data.startswith(magic)
    assert read_parameters(data) == text


def test_store_saves_and_finds_by_uuid_only(tmp_path):
    store = ImageStore(tmp_path / "images")
    image_id = store.save(b"\x89PNG fake", "png")
    path, media_type = store.find(image_id)
    assert path.read_bytes() == b"\x89PNG fake" and media_type == "image/png"
    assert store.find(image_id.upper())[0] == path
    for bad in ("../../etc/passwd", "..", "", "x" * 36, f"{image_id}/../..", "/etc/passwd"):
        with pytest.raises(InvalidRequest):
            store.find(bad)
    with pytest.raises(NotFound):
        store.find(str(uuid.uuid4()))
    assert not list((tmp_path / "images").glob(".*.tmp"))


# -- owners and sidecars -------------------------------------------------------------------------

def _age(store: ImageStore, image_id: str, mtime: float) -> None:
    """Pretend the image was made at ``mtime`` (the sweep reads only the image's mtime)."""
    os.utime(store.find(image_id)[0], (mtime, mtime))


def test_save_writes_a_sidecar_and_info_reads_the_owner(tmp_path):
    store = ImageStore(tmp_path)
    before = time.time()
    image_id = store.save(b"jpeg bytes", "jpeg", owner="alice")
    meta = json.loads((tmp_path / f"{image_id}.json").read_text())
    assert meta["owner"] == "alice" and meta["bytes"] == 10 and meta["format"] == "jpeg"
    assert before <= meta["created"] <= time.time()
    info = store.info(image_id.upper())
    assert info == StoredImage(path=tmp_path / f"{image_id}.jpeg", media_type="image/jpeg", owner="alice",
                               created=meta["created"])
    assert info.path.stat().st_mtime == pytest.approx(meta["created"], abs=1e-3)  # the sweep ages by mtime
    assert store.info(store.save(b"x", "png")).owner is None  # a service without keys
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(ValueError):
        store.save(b"x", "gif")


def test_info_of_an_image_without_sidecar_and_bad_ids(tmp_path):
    store = ImageStore(tmp_path)
    legacy = str(uuid.uuid4())
    (tmp_path / f"{legacy}.png").write_bytes(b"old")
    os.utime(tmp_path / f"{legacy}.png", (1_000_000, 1_000_000))
    assert store.info(legacy) == StoredImage(tmp_path / f"{legacy}.png", "image/png", None, 1_000_000)
    for bad in ("../../etc/passwd", "", f"{legacy}/.."):
        with pytest.raises(InvalidRequest):
            store.info(bad)
    with pytest.raises(NotFound):
        store.info(str(uuid.uuid4()))
    orphan = str(uuid.uuid4())  # a sidecar whose image is not (yet, or any more) there
    (tmp_path / f"{orphan}.json").write_text('{"owner": "bob", "created": 1}')
    with pytest.raises(NotFound):
        store.info(orphan)


@pytest.mark.parametrize("sidecar", ["{not json", '{"owner": 5, "created": 1}', '{"created": 1}', "[]"])
def test_an_unreadable_sidecar_fails_closed(tmp_path, sidecar):
    store = ImageStore(tmp_path)
    image_id = store.save(b"x", "png", owner="alice")
    (tmp_path / f"{image_id}.json").write_text(sidecar)
    with pytest.raises(NotFound):  # never "no owner", which would let anyone read it
        store.info(image_id)
    assert store.find(image_id)[1] == "image/png"


# -- sweep -----------------------------------------------------------------------------------

def test_sweep_deletes_by_age_with_sidecars(tmp_path):
    store = ImageStore(tmp_path)
    now = 1_000_000_000.0
    old = [store.save(b"o" * 10, "png", owner="a") for _ in range(3)]
    young = [store.save(b"y" * 10, "webp") for _ in range(2)]
    for i, image_id in enumerate(old):
        _age(store, image_id, now - 7 * 86_400 - 1 - i)
    for image_id in young:
        _age(store, image_id, now - 60)
    stats = store.sweep(max_age_s=7 * 86_400, max_bytes=10**9, now=now)
    assert stats == SweepStats(expired=3, evicted=0, freed_bytes=30, stale_files=0, remaining=2, remaining_bytes=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{i}.{ext}" for i in young for ext in ("webp", "json"))
    assert store.sweep(max_age_s=7 * 86_400, max_bytes=10**9, now=now) == SweepStats(remaining=2, remaining_bytes=20)


def test_sweep_keeps_the_store_under_its_byte_bound_oldest_first(tmp_path):
    store = ImageStore(tmp_path)
    now = 1_000_000_000.0
    ids = [store.save(bytes(100), "png") for _ in range(10)]
    for i, image_id in enumerate(ids):  # ids[0] is the oldest
        _age(store, image_id, now - 1000 + i)
    stats = store.sweep(max_age_s=86_400, max_bytes=450, now=now)
    assert (stats.deleted, stats.evicted, stats.expired, stats.freed_bytes) == (6, 6, 0, 600)
    assert (stats.remaining, stats.remaining_bytes) == (4, 400)
    for image_id in ids[:6]:
        with pytest.raises(NotFound):
            store.find(image_id)
        assert not (tmp_path / f"{image_id}.json").exists()
    assert [store.info(i).path.exists() for i in ids[6:]] == [True] * 4


def test_sweep_applies_age_then_bytes(tmp_path):
    store = ImageStore(tmp_path)
    now = 1_000_000_000.0
    ids = [store.save(bytes(100), "png") for _ in range(5)]
    for i, image_id in enumerate(ids):
        _age(store, image_id, now - 500 + 100 * i)  # ages 500, 400, 300, 200, 100
    stats = store.sweep(max_age_s=350, max_bytes=150, now=now)
    assert (stats.expired, stats.evicted, stats.remaining) == (2, 2, 1)
    assert store.find(ids[4])


def test_sweep_removes_stale_leftovers_only(tmp_path):
    store = ImageStore(tmp_path)
    now = time.time()
    kept = store.save(b"k", "png")
    names = {"stale_tmp": f".{uuid.uuid4()}.png.tmp", "fresh_tmp": f".{uuid.uuid4()}.json.tmp",
             "stale_orphan": f"{uuid.uuid4()}.json", "fresh_orphan": f"{uuid.uuid4()}.json",
             "other": "README.txt", "other_old": "notes.json"}
    for key, name in names.items():
        (tmp_path / name).write_text("{}")
        if "fresh" not in key:
            os.utime(tmp_path / name, (now - 7200, now - 7200))
    stats = store.sweep(max_age_s=86_400, max_bytes=10**9, now=now)
    assert stats == SweepStats(stale_files=2, remaining=1, remaining_bytes=1)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {f"{kept}.png", f"{kept}.json", names["fresh_tmp"], names["fresh_orphan"],
                    "README.txt", "notes.json"}


def test_a_file_deleted_by_another_sweeper_meanwhile_is_not_counted(tmp_path):
    class Racing(ImageStore):
        def _delete(self, name, image_id):
            os.unlink(self.root / name)  # another process got there first
            return super()._delete(name, image_id)

    store = Racing(tmp_path)
    for _ in range(3):
        store.save(bytes(10), "png")
    stats = store.sweep(max_age_s=60, max_bytes=10**9, now=time.time() + 3600)
    assert stats == SweepStats(remaining=0, remaining_bytes=0)


def test_concurrent_sweeps_and_saves(tmp_path):
    store = ImageStore(tmp_path)
    now = time.time()
    old = [store.save(bytes(10), "png") for _ in range(300)]
    for image_id in old:
        _age(store, image_id, now - 10_000)
    results: list[SweepStats] = []
    saved: list[str] = []

    def sweep():
        results.append(ImageStore(tmp_path).sweep(max_age_s=3600, max_bytes=10**9, now=now))

    def save():
        saved.extend(ImageStore(tmp_path).save(bytes(10), "jpeg") for _ in range(100))

    threads = [threading.Thread(target=f) for f in (sweep, save, sweep)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.expired for r in results) == 300
    assert {p.name for p in tmp_path.iterdir()} == {f"{i}.{ext}" for i in saved for ext in ("jpeg", "json")}
