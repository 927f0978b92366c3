"""Webhooks: targets checked after resolving names, Standard Webhooks signatures (verified by the
``standardwebhooks`` package), durable deliveries retried with backoff, every attempt on record. Deliveries go to
real HTTP receivers on the loopback (allowed explicitly, as an operator would)."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from sdxl_bento.http.auth import new_webhook_secret
from sdxl_bento.http.webhooks import (
    Targets,
    WebhookRefused,
    Webhooks,
    WebhookStore,
    _getaddrinfo,
    address_allowed,
    backoff,
    parse_allow,
    payload,
    sign,
)

SECRET = new_webhook_secret()


class Receiver:
    """A loopback HTTP receiver answering from a script of statuses (the last one repeats)."""

    def __init__(self, statuses=(204,), delay_s: float = 0.0):
        self.statuses = list(statuses)
        self.delay_s = delay_s
        self.got: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                time.sleep(receiver.delay_s)
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(*statuses, delay_s=0.0):
        r = Receiver(statuses or (204,), delay_s)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def hooks(tmp_path, *, allow="loopback", secret=SECRET, resolve=None, **kw) -> Webhooks:
    return Webhooks(WebhookStore(tmp_path / "webhooks.db"), Targets(allow, resolve=resolve),
                    secret_for=lambda owner: secret, retry_base_s=0.01, timeout_s=2, **kw)


def deliver_all(w: Webhooks, rounds: int = 20) -> None:
    for _ in range(rounds):
        if not w.run_due() and not w.store.counts().get("pending"):
            return
        time.sleep(0.03)


# -- where a webhook may go -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("address, allowed", [
    ("93.184.216.34", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("::1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("100.64.0.1", False), ("169.254.169.254", False), ("fe80::1", False), ("fc00::1", False), ("0.0.0.0", False),
    ("224.0.0.1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("2002:7f00:1::", False),
])
def test_only_public_addresses_by_default(address, allowed):
    assert address_allowed(ipaddress.ip_address(address), ()) is allowed


def test_the_operator_allows_ranges():
    loopback = parse_allow("loopback")
    assert address_allowed(ipaddress.ip_address("127.0.0.1"), loopback)
    assert address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"), loopback)
    assert not address_allowed(ipaddress.ip_address("10.0.0.1"), loopback)
    assert address_allowed(ipaddress.ip_address("10.9.9.9"), parse_allow("10.0.0.0/8, link-local"))
    assert address_allowed(ipaddress.ip_address("169.254.1.1"), parse_allow("10.0.0.0/8, link-local"))
    with pytest.raises(ValueError, match="neither a CIDR"):
        parse_allow("intranet")


def test_names_are_resolved_first_so_dns_cannot_smuggle_a_private_address():
    answers = {"hooks.example.com": ["93.184.216.34"], "sneaky.example.com": ["93.184.216.34", "10.0.0.7"],
               "rebind.example.com": ["127.0.0.1"]}
    targets = Targets("", resolve=lambda host, port: answers.get(host) or _getaddrinfo(host, port))  # 0x7f000001
    resolved = targets.check("https://hooks.example.com/sdxl?x=1")
    assert str(resolved.address) == "93.184.216.34" and resolved.port == 443 and resolved.host == "hooks.example.com"
    for url in ("https://sneaky.example.com/h", "http://rebind.example.com/h", "http://127.0.0.1:8080/",
                "http://[::ffff:169.254.169.254]/", "http://0x7f000001/"):
        with pytest.raises(WebhookRefused):
            targets.check(url)
    with pytest.raises(WebhookRefused, match="user name or password"):
        targets.check("http://user:pw@hooks.example.com/")
    with pytest.raises(WebhookRefused, match="http:// or https://"):
        targets.check("file:///etc/passwd")


def test_backoff_is_exponential_with_jitter_and_capped():
    for attempt in range(1, 8):
        low, high = backoff(attempt, 5, rng=lambda: 0.0), backoff(attempt, 5, rng=lambda: 0.999999)
        assert low == pytest.approx(5 * 2 ** (attempt - 1) / 2) and high == pytest.approx(5 * 2 ** (attempt - 1),
                                                                                          rel=1e-5)
    assert backoff(30, 5, rng=lambda: 1.0) == 3600


def test_signatures_verify_with_the_standard_webhooks_package():
    body = payload("job.completed", "t1", {"status": "completed"})
    headers = sign(SECRET, "msg_1", time.time(), body)
    assert Webhook(SECRET).verify(body, headers) == json.loads(body)
    assert json.loads(body)["type"] == "job.completed" and json.loads(body)["data"]["task_id"] == "t1"
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace("completed", "failed"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(body, headers)


# -- delivering -----------------------------------------------------------------------------------------------------
def test_a_delivery_is_signed_and_recorded(tmp_path, receiver):
    r = receiver(204)
    w = hooks(tmp_path)
    w.subscribe("t1", "alice", r.url, None)
    assert w.ended("t1", "completed", {"result": {"images": []}}) is not None
    deliver_all(w)
    (headers, body), = r.got
    assert Webhook(SECRET).verify(body, headers)["type"] == "job.completed"
    assert headers["host"] == f"127.0.0.1:{r.port}" and headers["content-type"] == "application/json"
    (delivery,) = w.store.history("t1")
    assert delivery["state"] == "delivered" and delivery["attempts"] == 1 and delivery["webhook_id"] == \
        headers["webhook-id"] and delivery["tries"][0]["status_code"] == 204


def test_events_not_asked_for_are_not_sent(tmp_path, receiver):
    r = receiver(204)
    w = hooks(tmp_path)
    w.subscribe("t1", "alice", r.url, ["job.failed"])
    assert w.ended("t1", "completed", {}) is None and w.progress("t1", {"step": 1}) is None
    assert w.ended("t1", "failed", {"reason": "deadline"}) is not None
    w.subscribe("t2", "alice", r.url, ["job.progress"])
    assert w.progress("t2", {"step": 1}) is not None
    assert w.progress("t2", {"step": 2}) is None  # throttled
    deliver_all(w)
    assert sorted(json.loads(body)["type"] for _, body in r.got) == ["job.failed", "job.progress"]


def test_a_receiver_that_fails_twice_then_succeeds(tmp_path, receiver):
    r = receiver(500, 503, 204)
    w = hooks(tmp_path)
    w.subscribe("t1", None, r.url, None)
    w.ended("t1", "canceled", {"reason": "cancelled"})
    deliver_all(w)
    ids = {headers["webhook-id"] for headers, _ in r.got}
    assert len(r.got) == 3 and len(ids) == 1  # one delivery, three attempts, one id
    (delivery,) = w.store.history("t1")
    assert delivery["state"] == "delivered" and [t["outcome"] for t in delivery["tries"]] == [
        "retry", "retry", "delivered"] and [t["status_code"] for t in delivery["tries"]] == [500, 503, 204]
    assert delivery["event"] == "job.cancelled"


def test_refused_connections_and_timeouts_are_retried_other_answers_are_not(tmp_path, receiver):
    w = hooks(tmp_path)
    closed = Receiver((204,))
    closed.close()  # nobody listens there any more: connection refused
    w.subscribe("refused", None, closed.url, None)
    w.ended("refused", "completed", {})
    slow = receiver(204, delay_s=3)
    w.subscribe("slow", None, slow.url, None)
    w.ended("slow", "completed", {})
    for job, status in (("gone", 404), ("moved", 302)):
        rr = receiver(status)
        w.subscribe(job, None, rr.url, None)
        w.ended(job, "completed", {})
    w.run_due()
    history = {job: w.store.history(job)[0] for job in ("refused", "slow", "gone", "moved")}
    assert history["refused"]["state"] == "pending" and "ConnectError" in history["refused"]["last_error"]
    assert history["slow"]["state"] == "pending" and "timed out" in history["slow"]["last_error"]
    assert history["gone"]["state"] == "failed" and history["gone"]["tries"][0]["status_code"] == 404
    assert history["moved"]["state"] == "failed" and "redirects are not followed" in history["moved"]["last_error"]


def test_a_delivery_gives_up_after_its_max_age(tmp_path, receiver):
    r = receiver(500)
    w = hooks(tmp_path, max_age_s=0.3)
    w.subscribe("t1", None, r.url, None)
    w.ended("t1", "completed", {})
    deadline = time.monotonic() + 5
    while w.store.history("t1")[0]["state"] == "pending" and time.monotonic() < deadline:
        w.run_due()
        time.sleep(0.02)
    (delivery,) = w.store.history("t1")
    assert delivery["state"] == "failed" and delivery["attempts"] >= 2
    assert "given up" in delivery["last_error"] or "expired" in delivery["last_error"]


def test_the_target_is_checked_again_at_every_attempt_and_the_checked_address_is_called(tmp_path, receiver):
    """The name resolves to the receiver's loopback address: the attempt goes there with the name in Host; once the
    name resolves to a refused address, the delivery fails without a connection."""
    r = receiver(204)
    answers = {"hooks.test": ["127.0.0.1"]}
    w = hooks(tmp_path, resolve=lambda host, port: answers[host])
    url = f"http://hooks.test:{r.port}/hook"
    w.subscribe("t1", None, url, None)
    w.ended("t1", "completed", {})
    deliver_all(w)
    assert r.got[0][0]["host"] == f"hooks.test:{r.port}"
    w_strict = hooks(tmp_path, allow="", resolve=lambda host, port: answers[host])
    w_strict.subscribe("t2", None, url, None)
    w_strict.ended("t2", "completed", {})
    deliver_all(w_strict)
    assert len(r.got) == 1
    (delivery,) = w_strict.store.history("t2")
    assert delivery["state"] == "failed" and "127.0.0.1" in delivery["last_error"]


def test_no_secret_no_delivery(tmp_path, receiver):
    r = receiver(204)
    w = hooks(tmp_path, secret=None)
    w.subscribe("t1", "ghost", r.url, None)
    w.ended("t1", "completed", {})
    deliver_all(w)
    assert r.got == [] and "no webhook secret for key 'ghost'" in w.store.history("t1")[0]["last_error"]


def test_pending_deliveries_survive_a_restart_and_are_claimed_once(tmp_path, receiver):
    closed = Receiver((204,))
    port = closed.port
    closed.close()
    w = hooks(tmp_path)
    w.subscribe("t1", "alice", f"http://127.0.0.1:{port}/hook", None)
    w.ended("t1", "completed", {"result": {"images": [{"id": "x"}]}})
    w.run_due()
    assert w.store.history("t1")[0]["state"] == "pending"
    w.store.close()

    again = hooks(tmp_path)  # a new process: the same file
    other = hooks(tmp_path)  # a second worker of that server
    time.sleep(0.05)
    first, second = again.store.claim(lease_s=30), other.store.claim(lease_s=30)
    assert len(first) == 1 and second == []  # leased by one worker only
    assert json.loads(first[0].body)["data"]["result"]["images"][0]["id"] == "x"
