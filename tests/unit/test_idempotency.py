"""Idempotency-Key storage: claims, answers kept or dropped, fingerprints, on SQLite and on a real Redis."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sdxl_bento.errors import IdempotencyMismatch, InvalidRequest
from sdxl_bento.http.idempotency import Idempotency, RedisBackend, SqliteBackend, fingerprint, parse_key


@pytest.fixture(params=["sqlite", "redis"])
def idem(request, tmp_path):
    if request.param == "sqlite":
        yield Idempotency(SqliteBackend(tmp_path / "idem.db"), lease_s=0.5, poll_s=0.01)
        return
    from tests.e2e.conftest import redis_process

    with redis_process() as (url, _):
        yield Idempotency(RedisBackend(url), lease_s=0.5, poll_s=0.01)


def test_first_claims_then_replays_and_a_different_request_is_422(idem):
    assert idem.begin("alice", "k", "fp1").state == "new"
    assert idem.begin("alice", "k", "fp1").state == "running"
    assert idem.begin("bob", "k", "fp1").state == "new"  # keys are the caller's
    assert idem.finish("alice", "k", "fp1", 200, [("content-type", "application/json"), ("x-ratelimit-remaining", "3")],
                       b'{"task_id": "t1"}')
    claim = idem.begin("alice", "k", "fp1")
    assert claim.state == "done" and claim.stored.body == b'{"task_id": "t1"}' and claim.stored.status == 200
    assert claim.stored.headers == [("content-type", "application/json")]
    with pytest.raises(IdempotencyMismatch) as caught:
        idem.begin("alice", "k", "fp2")
    assert caught.value.status == 422


def test_answers_that_say_try_again_are_not_kept(idem):
    assert idem.begin("a", "k", "fp").state == "new"
    assert not idem.finish("a", "k", "fp", 503, [], b"{}")
    assert idem.begin("a", "k", "fp").state == "new"
    idem.abandon("a", "k", "fp")
    assert idem.begin("a", "k", "fp").state == "new"


def test_a_waiting_retry_gets_the_answer_and_a_dead_claim_is_taken_over(idem):
    assert idem.begin("a", "k", "fp").state == "new"
    threading.Timer(0.2, lambda: idem.finish("a", "k", "fp", 202, [], b"done")).start()
    claim = asyncio.run(idem.wait("a", "k", "fp", timeout_s=5))
    assert claim.state == "done" and claim.stored.body == b"done"
    assert idem.begin("a", "k2", "fp").state == "new"  # its holder dies: the lease (0.5 s) runs out
    time.sleep(0.6)
    assert asyncio.run(idem.wait("a", "k2", "fp", timeout_s=5)).state == "new"


def test_keys_and_fingerprints():
    assert parse_key('"8e03978e-40d5-43e8-bc93-6894a57f9324"') == "8e03978e-40d5-43e8-bc93-6894a57f9324"
    assert parse_key("abc-123") == "abc-123"
    for bad in ("", '""', "a b", "x" * 256, "ключ"):
        with pytest.raises(InvalidRequest):
            parse_key(bad)
    same = fingerprint("POST", "/generate", {}, b'{"prompt": "a", "steps": 4}')
    assert same == fingerprint("POST", "/generate", {}, b'{"steps":4,"prompt":"a"}')
    assert same != fingerprint("POST", "/generate", {}, b'{"steps":5,"prompt":"a"}')
    assert same != fingerprint("POST", "/txt2img", {}, b'{"steps":4,"prompt":"a"}')
    assert same != fingerprint("POST", "/generate", {"prefer": "respond-async"}, b'{"steps":4,"prompt":"a"}')
