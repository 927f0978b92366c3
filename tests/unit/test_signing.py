"""signing: signed image links and forwarded requests."""

from __future__ import annotations

import stat
from urllib.parse import parse_qs

from sdxl_bento.http.signing import Signer


def test_image_links_expire_and_are_bound_to_their_image(tmp_path):
    signer = Signer.load(None, tmp_path)
    query = parse_qs(signer.image_query("img-1", ttl_s=60, now=1000))
    exp, sig = query["exp"][0], query["sig"][0]
    assert signer.image_link_valid("img-1", exp, sig, now=1030)
    assert not signer.image_link_valid("img-1", exp, sig, now=1061)  # expired
    assert not signer.image_link_valid("img-2", exp, sig, now=1030)  # another image
    assert not signer.image_link_valid("img-1", str(int(exp) + 100), sig, now=1030)  # a longer life, forged
    assert not signer.image_link_valid("img-1", None, None) and not signer.image_link_valid("img-1", "x", sig)


def test_the_secret_is_made_once_per_state_dir_and_kept_private(tmp_path):
    a, b = Signer.load(None, tmp_path), Signer.load(None, tmp_path)
    assert parse_qs(a.image_query("i", 60, now=0)) == parse_qs(b.image_query("i", 60, now=0))
    assert stat.S_IMODE((tmp_path / "internal-secret").stat().st_mode) == 0o600
    assert "secret" not in repr(Signer.load("x" * 32, tmp_path)).replace("<secret>", "")
    other = Signer.load("y" * 32, tmp_path)
    assert parse_qs(other.image_query("i", 60, now=0)) != parse_qs(a.image_query("i", 60, now=0))


def test_forwarded_requests_name_their_caller_for_a_minute():
    signer = Signer.load("z" * 32, "/nonexistent")
    headers = signer.forward_headers("alice", "GET", "/jobs/get", "task_id=1", now=100)
    assert signer.forwarded_caller(headers, "GET", "/jobs/get", "task_id=1", now=130) == "alice"
    assert signer.forwarded_caller(headers, "GET", "/jobs/get", "task_id=1", now=200) is None  # too old
    assert signer.forwarded_caller(headers, "GET", "/jobs/get", "task_id=2", now=130) is None  # another task
    assert signer.forwarded_caller({**headers, "x-sdxl-caller": "boss"}, "GET", "/jobs/get", "task_id=1",
                                   now=130) is None
