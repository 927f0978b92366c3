"""API keys and tiers: keys files, authentication, overrides, clear errors, add_key, tier limits."""

import hashlib
import stat
import tomllib

import pytest
import yaml

from sdxl_bento.auth import (DEFAULT_TIERS, OPEN_TIER, Forbidden, KeyStore, Unauthorized, add_key, check_request,
                             extract_key)
from sdxl_bento.errors import ServiceError

KEY_A, KEY_B = "sk-sdxl-alpha", "sk-sdxl-bravo"
SHA_A, SHA_B = (hashlib.sha256(k.encode()).hexdigest() for k in (KEY_A, KEY_B))

YAML_FILE = f"""
tiers:
  free: {{requests_per_minute: 5}}
  gold: {{priority: 20, requests_per_minute: 1000, images_per_minute: 2000, burst_requests: 100,
          burst_images: 200, max_concurrent_jobs: 32, max_pixels: 4194304, max_steps: 100, max_images: 8,
          default_deadline_s: 900, refiner_allowed: true, safety_optional: true}}
keys:
  - name: marketing
    sha256: "{SHA_A}"
    tier: standard
    overrides: {{images_per_minute: 200}}
  - name: intern
    sha256: "{SHA_B.upper()}"
    tier: free
"""

TOML_FILE = f"""
[tiers.free]
requests_per_minute = 5

[[keys]]
name = "marketing"
sha256 = "{SHA_A}"
tier = "standard"
overrides = {{ images_per_minute = 200 }}

[[keys]]
name = "intern"
sha256 = "{SHA_B}"
tier = "free"
"""


def test_default_tiers_are_sane():
    free, standard, premium = (DEFAULT_TIERS[n] for n in ("free", "standard", "premium"))
    assert free.priority < standard.priority < premium.priority
    assert OPEN_TIER.priority == standard.priority and OPEN_TIER.refiner_allowed and OPEN_TIER.safety_optional
    for lower, higher in ((free, standard), (standard, premium)):
        for field in ("requests_per_minute", "images_per_minute", "burst_requests", "burst_images",
                      "max_concurrent_jobs", "max_pixels", "max_steps", "max_images", "default_deadline_s"):
            assert getattr(lower, field) < getattr(higher, field), field
    for tier in DEFAULT_TIERS.values():
        assert tier.burst_images >= tier.max_images  # one maximal request always fits the bucket
    assert not free.refiner_allowed and not free.safety_optional and premium.safety_optional


@pytest.mark.parametrize("suffix, text", [(".yaml", YAML_FILE), (".toml", TOML_FILE)])
def test_load_and_authenticate(tmp_path, suffix, text):
    path = tmp_path / f"keys{suffix}"
    path.write_text(text)
    store = KeyStore.load(path)
    marketing = store.authenticate(KEY_A)
    assert marketing.name == "marketing" and marketing.key_id == SHA_A[:8]
    assert marketing.tier.name == "standard" and marketing.tier.images_per_minute == 200.0
    assert marketing.tier.requests_per_minute == DEFAULT_TIERS["standard"].requests_per_minute
    intern = store.authenticate(KEY_B)
    assert intern.name == "intern" and intern.tier.requests_per_minute == 5.0  # tier override from the file
    assert store.tiers["free"].max_steps == DEFAULT_TIERS["free"].max_steps
    assert store.authenticate("sk-sdxl-wrong") is None
    assert store.authenticate(None) is None and store.authenticate("") is None
    assert store.principal({"Authorization": f"Bearer {KEY_B}"}).name == "intern"
    for headers in ({}, {"x-api-key": "nope"}):
        with pytest.raises(Unauthorized) as err:
            store.principal(headers)
        assert err.value.status == 401 and "WWW-Authenticate" in err.value.headers()


def test_new_tier_defined_in_the_file(tmp_path):
    (tmp_path / "k.yml").write_text(YAML_FILE)
    gold = KeyStore.load(tmp_path / "k.yml").tiers["gold"]
    assert gold.priority == 20 and gold.max_pixels == 4194304 and isinstance(gold.requests_per_minute, float)


def _entry(**changes):
    return {"keys": [{"name": "k", "sha256": SHA_A, "tier": "free", **changes}]}


@pytest.mark.parametrize("data, message", [
    (_entry(tier="gold"), "key 'k': unknown tier 'gold'"),
    (_entry(sha256="abc123"), "key 'k': sha256 must be 64 hex"),
    (_entry(sha256="g" * 64), "key 'k': sha256 must be 64 hex"),
    (_entry(overrides={"speed": 3}), "key 'k': unknown override fields ['speed']"),
    (_entry(overrides={"name": "x"}), "unknown override fields ['name']"),
    (_entry(overrides={"max_steps": -1}), "key 'k': overrides: max_steps must be above 0"),
    (_entry(overrides={"refiner_allowed": "yes"}), "refiner_allowed must be bool"),
    (_entry(secret="x"), "key 'k': unknown fields ['secret']"),
    ({"keys": [{"name": "k", "sha256": SHA_A, "tier": "free"}, {"name": "k", "sha256": SHA_B, "tier": "free"}]},
     "key 'k': duplicate name"),
    ({"keys": [{"name": "a", "sha256": SHA_A, "tier": "free"}, {"name": "b", "sha256": SHA_A, "tier": "free"}]},
     "key 'b': same sha256 as key 'a'"),
    ({"tiers": {"gold": {"priority": 1}}}, "tier 'gold' is new, so it needs every field"),
    ({"tiers": {"free": {"colour": "red"}}}, "tier 'free': unknown fields ['colour']"),
    ({"users": []}, "unknown top-level entries ['users']"),
    ({"keys": [{"sha256": SHA_A, "tier": "free"}]}, "keys[0]: key name None"),
])
def test_invalid_data_names_the_problem(data, message):
    with pytest.raises(ValueError) as err:
        KeyStore.from_dict(data)
    assert message in str(err.value)


def test_invalid_file_names_the_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(_entry(tier="gold")))
    with pytest.raises(ValueError, match=r"keys\.yaml: key 'k': unknown tier 'gold'"):
        KeyStore.load(path)
    path.write_text("keys: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        KeyStore.load(path)
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.toml"):
        KeyStore.load(tmp_path / "keys.json")
    with pytest.raises(ValueError, match="cannot read"):
        KeyStore.load(tmp_path / "missing.toml")


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_add_key(tmp_path, suffix):
    path = tmp_path / "conf" / f"keys{suffix}"
    key = add_key(path, "ops", "premium")
    assert key.startswith("sk-sdxl-") and len(key) > 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key not in path.read_text()
    key2 = add_key(path, 'team "x" \\ y', "free")
    store = KeyStore.load(path)
    assert store.authenticate(key).name == "ops" and store.authenticate(key).tier == DEFAULT_TIERS["premium"]
    assert store.authenticate(key2).name == 'team "x" \\ y'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="'ops' already exists"):
        add_key(path, "ops", "free")
    with pytest.raises(ValueError, match="unknown tier 'gold'"):
        add_key(path, "new", "gold")
    assert KeyStore.load(path).names == ["ops", 'team "x" \\ y']


def test_add_key_keeps_existing_toml_content(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text("# hand-written\n" + TOML_FILE)
    key = add_key(path, "late", "free")
    text = path.read_text()
    assert text.startswith("# hand-written\n") and tomllib.loads(text)["tiers"]["free"]["requests_per_minute"] == 5
    store = KeyStore.load(path)
    assert store.names == ["marketing", "intern", "late"]
    assert store.authenticate(key).tier.requests_per_minute == 5.0  # the file's tier override applies
    path.write_text(f'keys = [{{ name = "a", sha256 = "{SHA_A}", tier = "free" }}]\n')
    with pytest.raises(ValueError, match="cannot add the key"):
        add_key(path, "b", "free")
    assert KeyStore.load(path).names == ["a"]


def test_add_key_to_existing_yaml(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(YAML_FILE)
    path.chmod(0o640)
    key = add_key(path, "late", "gold")
    store = KeyStore.load(path)
    assert store.names == ["marketing", "intern", "late"] and store.authenticate(key).tier.priority == 20
    assert store.authenticate(KEY_A).tier.images_per_minute == 200
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # an existing file keeps its mode


def test_extract_key():
    assert extract_key({"Authorization": "Bearer abc"}) == "abc"
    assert extract_key({"authorization": "bearer  abc "}) == "abc"
    assert extract_key({"X-API-Key": "xyz"}) == "xyz"
    assert extract_key({"x-api-key": "xyz"}) == "xyz"
    assert extract_key({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": "xyz"}) == "xyz"
    assert extract_key({"authorization": "Bearer abc", "x-api-key": "xyz"}) == "abc"
    assert extract_key({}) is None
    assert extract_key({"authorization": "Bearer ", "x-api-key": ""}) is None
    assert extract_key({"content-type": "application/json"}) is None


def test_extract_key_from_starlette_headers():
    from starlette.datastructures import Headers

    assert extract_key(Headers(raw=[(b"x-api-key", b"xyz")])) == "xyz"
    assert extract_key(Headers(headers={"Authorization": "BEARER abc"})) == "abc"


FREE = DEFAULT_TIERS["free"]
OK = {"width": 1024, "height": 1024, "steps": 40, "num_images": 2, "refine": False}


@pytest.mark.parametrize("changes, message, limit", [
    ({"width": 1024, "height": 1032}, "1024x1032 (1056768 pixels) is above the free tier's limit of 1048576 pixels",
     "max_pixels"),
    ({"steps": 80}, "steps 80 is above the free tier's limit of 40", "max_steps"),
    ({"num_images": 3}, "num_images 3 is above the free tier's limit of 2", "max_images"),
    ({"refine": True}, "the free tier may not use the refiner", "refiner_allowed"),
    ({"safety_check": False}, "the free tier may not turn off the safety check", "safety_optional"),
])
def test_check_request_names_the_limit(changes, message, limit):
    check_request(FREE, **OK)
    with pytest.raises(Forbidden) as err:
        check_request(FREE, **{**OK, **changes})
    assert isinstance(err.value, ServiceError) and err.value.status == 403
    assert err.value.message == message
    assert err.value.body()["error"]["limit"] == limit and err.value.body()["error"]["tier"] == "free"


def test_open_and_premium_allow_everything_the_api_does():
    for tier in (OPEN_TIER, DEFAULT_TIERS["premium"]):
        check_request(tier, width=2048, height=2048, steps=100, num_images=8, refine=True, safety_check=False)


def test_keys_never_appear_in_reprs(tmp_path):
    path = tmp_path / "keys.yaml"
    key = add_key(path, "ops", "standard")
    store = KeyStore.load(path)
    principal = store.authenticate(key)
    sha = hashlib.sha256(key.encode()).hexdigest()
    assert repr(store) == "KeyStore(keys=1, tiers=3)"
    for text in (repr(store), repr(principal), str(principal)):
        assert key not in text and key[len("sk-sdxl-"):] not in text and sha not in text
    with pytest.raises(Unauthorized) as err:
        store.principal({"x-api-key": key + "x"})
    assert key not in str(err.value.body())
