"""API keys and tiers: keys files, authentication, overrides, clear errors, add_key, tier limits, and
``KeyFile`` following a keys file on a running service (file changes, SIGHUP, bad edits)."""

import hashlib
import logging
import os
import signal
import stat
import threading
import time

import pytest
import tomllib
import yaml

from sdxl_bento.cli import main as cli
from sdxl_bento.core.policy import DEFAULT_TIERS, OPEN_PRINCIPAL, OPEN_TIER, Principal
from sdxl_bento.http.auth import KeyFile, KeyStore, add_key, extract_key

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
    assert store.by_name("intern") is intern and store.by_name("marketing") is marketing
    assert store.by_name("nobody") is None and store.by_name(SHA_A) is None
    assert not marketing.operator and not marketing.anonymous


def test_operator_keys(tmp_path):
    store = KeyStore.from_dict({"keys": [{"name": "ops", "sha256": SHA_A, "tier": "free", "operator": True},
                                         {"name": "user", "sha256": SHA_B, "tier": "free", "operator": False}]})
    assert store.authenticate(KEY_A).operator and not store.authenticate(KEY_B).operator
    assert store.by_name("ops").operator
    toml = tmp_path / "keys.toml"
    toml.write_text(f'[[keys]]\nname = "ops"\nsha256 = "{SHA_A}"\ntier = "free"\noperator = true\n')
    assert KeyStore.load(toml).authenticate(KEY_A).operator


def test_anonymity_belongs_to_the_principal_not_the_tier_name():
    assert OPEN_PRINCIPAL.anonymous and not OPEN_PRINCIPAL.operator and OPEN_PRINCIPAL.tier is OPEN_TIER
    open_tier = {"priority": 1, "requests_per_minute": 1, "images_per_minute": 1, "burst_requests": 1,
                 "burst_images": 1, "max_concurrent_jobs": 1, "max_pixels": 4096, "max_steps": 1, "max_images": 1,
                 "default_deadline_s": 1, "refiner_allowed": False, "safety_optional": False}
    store = KeyStore.from_dict({"tiers": {"open": open_tier}, "keys": [{"name": "k", "sha256": SHA_A, "tier": "open"}]})
    principal = store.authenticate(KEY_A)
    assert principal.tier.name == "open" and not principal.anonymous
    assert Principal("x", OPEN_TIER, "").anonymous is False  # positional construction still works


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
    (_entry(operator="yes"), "key 'k': operator must be true or false"),
    (_entry(operator=1), "key 'k': operator must be true or false"),
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


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_add_operator_key(tmp_path, suffix):
    path = tmp_path / f"keys{suffix}"
    user = add_key(path, "user", "free")
    ops = add_key(path, "ops", "standard", operator=True)
    store = KeyStore.load(path)
    assert store.authenticate(ops).operator and not store.authenticate(user).operator
    assert "operator" not in path.read_text().split("ops")[0]  # written only where true


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


def test_keys_never_appear_in_reprs_logs_or_errors(tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    key = add_key(path, "ops", "standard")
    store = KeyStore.load(path)
    keys = KeyFile(path, check_every_s=0)
    principal = store.authenticate(key)
    sha = hashlib.sha256(key.encode()).hexdigest()
    assert repr(store) == "KeyStore(keys=1, tiers=3)"
    assert repr(keys) == f"KeyFile({str(path)!r}, keys=1)"

    caplog.set_level(logging.DEBUG)
    good = path.read_text()
    path.write_text(good + f"- name: pasted\n  sha256: {key}: x\n")  # a raw key pasted; YAML would quote the line
    assert keys.authenticate(key) == principal  # the old keys are kept
    with pytest.raises(ValueError) as err:
        KeyStore.load(path)
    path.write_text(good + f"  - name: pasted\n    sha256: {key}\n    tier: free\n")
    with pytest.raises(ValueError) as err2:
        KeyStore.load(path)
    assert keys.authenticate(key) == principal
    path.write_text(good)
    assert keys.reload()
    assert "not reloaded" in caplog.text and "reloaded: 1 keys" in caplog.text
    for text in (repr(store), repr(keys), repr(principal), str(principal), str(err.value), str(err2.value),
                 caplog.text):
        assert sha not in text and not _fragments_of(key, text)


def _fragments_of(key: str, text: str) -> list[str]:
    """Pieces of the key's random part (8 characters or more) found in ``text``."""
    body = key[len("sk-sdxl-"):]
    return [body[i:i + 8] for i in range(len(body) - 7) if body[i:i + 8] in text]


# -- KeyFile: the keys of a running service ----------------------------------------------------------

def test_keys_add_takes_effect_without_a_restart(tmp_path, capsys):
    """``sdxl-bento keys add`` on the file a running service reads: the new key works at once."""
    path = tmp_path / "keys.yaml"
    assert cli.main(["keys", "add", "first", "--tier", "free", "--file", str(path)]) == 0
    first = capsys.readouterr().out.split()[-1]
    keys = KeyFile(path, check_every_s=0.05)
    assert keys.authenticate(first).name == "first" and len(keys) == 1

    assert cli.main(["keys", "add", "second", "--tier", "premium", "--file", str(path)]) == 0
    second = capsys.readouterr().out.split()[-1]
    time.sleep(0.06)
    assert keys.authenticate(second).name == "second" and keys.authenticate(second).tier.name == "premium"
    assert keys.by_name("second").tier.name == "premium" and keys.names == ["first", "second"] and len(keys) == 2
    assert keys.authenticate(first).name == "first"
    assert keys.store.by_name("first") is not None and "premium" in keys.tiers


def test_changes_are_checked_at_most_once_per_interval(tmp_path):
    path = tmp_path / "keys.toml"
    add_key(path, "a", "free")
    keys = KeyFile(path, check_every_s=3600)
    late = add_key(path, "late", "free")
    assert keys.authenticate(late) is None  # not stat'ed again within the hour
    assert keys.reload() and keys.authenticate(late).name == "late"


def test_an_edit_in_place_is_seen(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(_entry()))
    keys = KeyFile(path, check_every_s=0)
    inode = path.stat().st_ino
    path.write_text(yaml.safe_dump({"keys": [{"name": "k", "sha256": SHA_A, "tier": "premium"}]}))
    assert path.stat().st_ino == inode
    assert keys.authenticate(KEY_A).tier.name == "premium"


def test_a_bad_file_keeps_the_keys_loaded_before(tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    path.write_text(YAML_FILE)
    keys = KeyFile(path, check_every_s=0)
    caplog.set_level(logging.INFO, logger="sdxl_bento.http.auth")
    for bad, problem in ((yaml.safe_dump(_entry(tier="gold")), "unknown tier 'gold'"),
                         ("keys: [unclosed", "not valid YAML"),
                         ("", "the file is empty"),
                         ("\n  \n", "the file is empty")):
        caplog.clear()
        path.write_text(bad)
        assert keys.authenticate(KEY_A).name == "marketing" and len(keys) == 2
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and problem in errors[0].getMessage() and "2 keys" in errors[0].getMessage()
        keys.authenticate(KEY_A)
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # once per change
    caplog.clear()
    path.unlink()
    assert keys.authenticate(KEY_B).name == "intern"
    assert keys.authenticate(KEY_B).name == "intern"
    assert [r.levelno for r in caplog.records] == [logging.ERROR] and "cannot read" in caplog.text
    path.write_text(yaml.safe_dump(_entry()))
    assert keys.authenticate(KEY_A).name == "k" and keys.authenticate(KEY_B) is None
    assert caplog.records[-1].levelno == logging.INFO and caplog.records[-1].getMessage().endswith("reloaded: 1 keys")


def test_a_bad_file_at_start_is_refused(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(_entry(tier="gold")))
    with pytest.raises(ValueError, match="unknown tier 'gold'"):
        KeyFile(path)
    with pytest.raises(ValueError, match="cannot read"):
        KeyFile(tmp_path / "missing.yaml")
    with pytest.raises(ValueError):
        KeyFile(path.with_suffix(".json"))


def test_sighup_reloads_and_chains_the_previous_handler(tmp_path):
    path = tmp_path / "keys.yaml"
    add_key(path, "a", "free")
    keys = KeyFile(path, check_every_s=3600)
    late = add_key(path, "late", "free")
    seen = []
    original = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, lambda signum, frame: seen.append(signum))
        keys.install_sighup()
        keys.install_sighup()  # twice: still one reload, one call of the previous handler
        signal.raise_signal(signal.SIGHUP)
        assert seen == [signal.SIGHUP]
        assert keys.authenticate(late).name == "late"
    finally:
        signal.signal(signal.SIGHUP, original)


def test_threads_authenticate_while_the_file_changes(tmp_path):
    path = tmp_path / "keys.yaml"
    stable = add_key(path, "stable", "free")
    keys = KeyFile(path, check_every_s=0)
    failures = []

    def work() -> None:
        for _ in range(300):
            if keys.authenticate(stable) is None:
                failures.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    added = [add_key(path, f"k{i}", "free") for i in range(10)]
    for t in threads:
        t.join()
    assert not failures
    assert all(keys.authenticate(k) is not None for k in added) and len(keys) == 11
    assert os.stat(path).st_size > 0
