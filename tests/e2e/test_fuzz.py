"""Hostile input: schemathesis generates requests from the service's own OpenAPI document.

Whatever arrives, the service answers without a server error (a 503 is allowed only as a deliberate
overload or deadline answer, with Retry-After), and every error is a JSON body with a message.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from .conftest import private_home, service_env, serving

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fuzz_server(bentoml_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    # The smallest allowed image area keeps every valid generation cheap on a CPU.
    env = service_env(private_home(bentoml_home, root), root / "images", max_pixels=256 * 256, timeout=30,
                      max_concurrency=8, concurrency=2)
    with serving(env, root / "server.log") as srv:
        yield srv


def error_message(response) -> str:
    body = response.json()
    error = body[0]["error"] if isinstance(body, list) else body["error"]
    return error["message"] if isinstance(error, dict) else error


def test_no_server_errors_and_every_error_explains_itself(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/docs.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/generate" for op in operations)
    seen: dict[int, int] = {}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=fuzz_server.url, timeout=120)
            status = response.status_code
            seen[status] = seen.get(status, 0) + 1
            headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
            if status >= 500:
                assert status == 503 and "retry-after" in headers, (case.method, case.path, status, response.text)
            if status >= 400:
                assert headers.get("content-type", "").startswith("application/json"), (case.path, response.text)
                assert error_message(response), response.text

        check()
    print("fuzzed", [f"{op.method.upper()} {op.path}" for op in operations], "statuses", seen)
    assert seen.get(200, 0) > 0 and sum(n for code, n in seen.items() if 400 <= code < 500) > 0, seen


def test_oversized_bodies_and_wrong_content_types(fuzz_server):
    url = f"{fuzz_server.url}/generate"
    big = httpx.post(url, content=b'{"prompt": "' + b"x" * (17 * 2**20) + b'"}',
                     headers={"content-type": "application/json"}, timeout=60)
    assert big.status_code == 413 and big.json()["error"]["type"] == "payload_too_large"
    form = httpx.post(url, data={"prompt": "a cat"}, timeout=60)
    assert form.status_code == 415 and "application/json" in form.json()["error"]["message"]
    for raw in (b"{", b"null", b'"prompt"', b'{"prompt": 5}', "{\"prompt\": \"\ud800\"}".encode("utf-8", "surrogatepass")):
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
