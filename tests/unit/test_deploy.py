"""The deployment files in deploy/: Kubernetes manifests, systemd units, the multi-GPU BentoML config.

Checked by configuration only (no cluster, no GPU, no systemd running):
- the Kustomize base and production overlay render (``kubectl kustomize`` where installed, else the small
  renderer below, which is checked against kubectl where both exist), every object validates against the
  Kubernetes JSON schemas (``kubernetes-validate``, offline, strict), and the properties that matter hold:
  no Secret rendered (the operator's is never overwritten), Redis behind a password from that Secret and a
  NetworkPolicy, a read-only root with a volume for every path written at run time, a grace period that
  covers the preStop sleep and the service's own grace;
- the systemd units pass ``systemd-analyze verify`` (where installed) and carry the keys that matter;
- BentoML 1.4.39's own serving code, given two fake GPUs, shows what each worker gets.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.29.0", "1.33.0")  # oldest and newest minor versions the manifests are meant for
SECRET_EXAMPLE = K8S / "secret.example.yaml"  # the keys of the Secret the operator creates; never applied
SECRET_NAME = "sdxl-bento-secrets"
SECRET_KEYS = {"keys.yaml", "SDXL_BENTO_REDIS_URL", "REDIS_PASSWORD", "SDXL_BENTO_INTERNAL_SECRET"}
EXIT_MARGIN_S = 30  # after the service's grace: fail what is left, journal it, stop the worker, exit


# -- Kustomize ----------------------------------------------------------------------------------

def _strategic_merge(target: dict, patch: dict) -> None:
    """Strategic merge as kustomize does it for these files: maps merge, lists of named items merge by name."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _strategic_merge(target[key], value)
        elif (isinstance(value, list) and isinstance(target.get(key), list) and value
              and all(isinstance(v, dict) and "name" in v for v in value + target[key])):
            by_name = {item["name"]: item for item in target[key]}
            added = []
            for item in value:
                if item["name"] in by_name:
                    _strategic_merge(by_name[item["name"]], item)
                else:
                    added.append(copy.deepcopy(item))
            target[key][:0] = added  # kustomize puts new items first
        else:
            target[key] = copy.deepcopy(value)


def _json6902(target: dict, ops: list[dict]) -> None:
    for op in ops:
        assert op["op"] in ("add", "replace"), f"renderer supports add/replace only, not {op['op']}"
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = target
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), op["value"]) if op["op"] == "add" \
                else node.__setitem__(int(last), op["value"])
        else:
            node[last] = op["value"]


def _pod_containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def render(folder: Path) -> list[dict]:
    """The subset of kustomize these manifests use: resources, labels (metadata only), patches
    (strategic merge by file, JSON 6902 with a kind target), images, replicas, namespace."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "labels", "patches", "images", "replicas", "namespace"}
    assert set(k) <= known, f"the test's renderer does not know {set(k) - known}"
    objs: list[dict] = []
    for res in k.get("resources", []):
        path = folder / res
        objs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in k.get("patches", []):
        patch = yaml.safe_load((folder / entry["path"]).read_text() if "path" in entry else entry["patch"])
        if isinstance(patch, list):
            for obj in objs:
                if all(obj.get(f, obj["metadata"].get(f)) == v for f, v in entry["target"].items()):
                    _json6902(obj, patch)
        else:
            (obj,) = [o for o in objs if (o["kind"], o["metadata"]["name"]) ==
                      (patch["kind"], patch["metadata"]["name"])]
            _strategic_merge(obj, patch)
    for entry in k.get("labels", []):
        assert not entry.get("includeSelectors") and not entry.get("includeTemplates")
        for obj in objs:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in k.get("images", []):
        for obj in objs:
            for container in _pod_containers(obj):
                name = re.split(r"[:@]", container["image"].rsplit("/", 1)[-1])[0]
                prefix = container["image"].rsplit("/", 1)[0] + "/" if "/" in container["image"] else ""
                if prefix + name == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for entry in k.get("replicas", []):
        for obj in objs:
            if obj["metadata"]["name"] == entry["name"] and "replicas" in obj.get("spec", {}):
                obj["spec"]["replicas"] = entry["count"]
    if "namespace" in k:
        for obj in objs:
            obj["metadata"]["namespace"] = k["namespace"]
    return objs


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _kubectl_kustomize(folder: Path) -> list[dict] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=["base", "overlays/production"])
def rendered(request) -> tuple[str, dict[tuple[str, str], dict]]:
    folder = K8S / request.param
    objs = render(folder)
    by_kubectl = _kubectl_kustomize(folder)
    if by_kubectl is not None:  # the small renderer must agree with the real kustomize
        assert {_key(o): o for o in by_kubectl} == {_key(o): o for o in objs}
    return request.param, {_key(o): o for o in objs}


def test_every_object_validates_against_the_kubernetes_schemas(rendered):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (the schemas, offline) is in the test extras")
    _, objs = rendered
    for version in K8S_VERSIONS:
        for obj in objs.values():
            kubernetes_validate.validate(obj, version, strict=True)
    broken = copy.deepcopy(objs["Deployment", "sdxl-bento"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/livez"
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator is not a no-op
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def _container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return found


def test_deployment_probes_gpu_and_resources(rendered):
    _, objs = rendered
    deploy = objs["Deployment", "sdxl-bento"]
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["serve", "--port", "3000"]
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz"), ("startupProbe", "/livez")):
        assert c[probe]["httpGet"]["path"] == path, probe
        assert _container_port(c, c[probe]["httpGet"]["port"]) == 3000, probe
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600  # model load + warm-up + compile
    res = c["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]
    assert pod["securityContext"]["runAsUser"] == 1034  # the bentoml user of the image
    config = objs["ConfigMap", "sdxl-bento-config"]["data"]
    assert config["SDXL_BENTO_WORKERS"] == "1"  # one worker per pod, one GPU per pod


def _secret_example() -> dict:
    (secret,) = [d for d in yaml.safe_load_all(SECRET_EXAMPLE.read_text()) if d]
    return secret


def test_settings_come_from_the_configmap_and_the_secret(rendered):
    from sdxl_bento.http.auth import KeyStore
    from sdxl_bento.settings import Settings

    _, objs = rendered
    (c,) = objs["Deployment", "sdxl-bento"]["spec"]["template"]["spec"]["containers"]
    config = objs["ConfigMap", "sdxl-bento-config"]
    secret = _secret_example()
    assert c["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]
                   if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(from_secret) == {"SDXL_BENTO_REDIS_URL", "SDXL_BENTO_INTERNAL_SECRET"}
    for ref in from_secret.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # every setting is one the service knows, with a value it accepts (the Secret's as in the example)
    env = {**config["data"], **{e["name"]: e["value"] for e in c["env"] if "value" in e}}
    env.update({name: secret["stringData"][ref["key"]] for name, ref in from_secret.items()})
    fields = {k.removeprefix("SDXL_BENTO_").lower(): v for k, v in env.items() if k.startswith("SDXL_BENTO_")}
    assert set(fields) <= set(Settings.model_fields), set(fields) - set(Settings.model_fields)
    settings = Settings(_env_file=None, **fields)
    KeyStore.from_dict(yaml.safe_load(secret["stringData"]["keys.yaml"]))  # the placeholder keys file parses
    # the folders and the keys file are where the volumes are mounted
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in objs["Deployment", "sdxl-bento"]["spec"]["template"]["spec"]["volumes"]}
    pvcs = {name for kind, name in objs if kind == "PersistentVolumeClaim"}
    for folder in (settings.image_dir, settings.state_dir):
        claim = volumes[mounts[str(folder)]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in pvcs
    assert mounts[str(settings.state_dir)]["subPathExpr"] == "$(POD_NAME)"  # each pod its own journal
    keys_volume = volumes[mounts[str(settings.keys_file.parent)]["name"]]["secret"]
    assert keys_volume["secretName"] == secret["metadata"]["name"]
    assert [i["path"] for i in keys_volume["items"]] == [settings.keys_file.name]
    # Redis: the URL names the Redis Service and its port, with Redis's password
    redis_svc = objs["Service", "sdxl-bento-redis"]
    url = urlsplit(settings.redis())
    assert url.scheme == "redis" and url.path == "/0"
    assert url.hostname == redis_svc["metadata"]["name"] and url.port == redis_svc["spec"]["ports"][0]["port"]
    assert url.password == secret["stringData"]["REDIS_PASSWORD"] and not url.username
    assert settings.internal_secret is not None


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_pdb_and_hpa_point_at_the_right_pods(rendered):
    _, objs = rendered
    for deploy_name, svc_name in (("sdxl-bento", "sdxl-bento"), ("sdxl-bento-redis", "sdxl-bento-redis")):
        deploy = objs["Deployment", deploy_name]
        pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
        assert _selects(deploy["spec"]["selector"]["matchLabels"], pod_labels)
        assert _selects(objs["Service", svc_name]["spec"]["selector"], pod_labels)
    server = objs["Deployment", "sdxl-bento"]
    (svc_port,) = objs["Service", "sdxl-bento"]["spec"]["ports"]
    assert svc_port["port"] == 3000
    assert _container_port(server["spec"]["template"]["spec"]["containers"][0], svc_port["targetPort"]) == 3000
    pdb = objs["PodDisruptionBudget", "sdxl-bento"]
    assert pdb["spec"]["selector"]["matchLabels"] == server["spec"]["selector"]["matchLabels"]
    # the Redis pods are not in the server's PDB or Service
    redis_labels = objs["Deployment", "sdxl-bento-redis"]["spec"]["template"]["metadata"]["labels"]
    assert not _selects(pdb["spec"]["selector"]["matchLabels"], redis_labels)
    hpa = objs["HorizontalPodAutoscaler", "sdxl-bento"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sdxl-bento"}
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "sdxl_queue_depth"
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]


def test_the_adapter_rule_serves_the_metric_the_service_exports(rendered):
    _, objs = rendered
    rules = yaml.safe_load(objs["ConfigMap", "sdxl-bento-prometheus-adapter"]["data"]["config.yaml"])["rules"]
    (rule,) = rules
    assert rule["name"]["as"] == "sdxl_queue_depth" and re.match(rule["name"]["matches"], "sdxl_queue_depth")
    assert rule["seriesQuery"].startswith("sdxl_queue_depth{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # the service really exports a gauge of that name (telemetry.py; /metrics is checked end to end in
    # tests/e2e/test_container.py)
    assert 'Gauge("sdxl_queue_depth"' in (REPO / "sdxl_bento" / "telemetry.py").read_text()


def test_production_overlay_changes_what_it_should():
    base = {_key(o): o for o in render(K8S / "base")}
    prod = {_key(o): o for o in render(K8S / "overlays" / "production")}
    assert set(base) == set(prod)
    assert {o["metadata"].get("namespace") for o in prod.values()} == {"sdxl"}
    deploy = prod["Deployment", "sdxl-bento"]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    name, tag = c["image"].rsplit(":", 1)
    assert name.endswith("/sdxl-bento") and "/" in name and tag not in ("latest", "")
    assert deploy["spec"]["replicas"] == 2
    assert prod["HorizontalPodAutoscaler", "sdxl-bento"]["spec"]["minReplicas"] == 2
    (base_c,) = base["Deployment", "sdxl-bento"]["spec"]["template"]["spec"]["containers"]
    assert c["resources"] != base_c["resources"] and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["livenessProbe"] == base_c["livenessProbe"]  # the patch merged, did not replace the container
    assert all(p["spec"]["storageClassName"] for k, p in prod.items() if k[0] == "PersistentVolumeClaim")


# -- the Secret, Redis's password, network policies ---------------------------------------------

def _pod_specs(objs: dict) -> dict[str, dict]:
    return {name: o["spec"]["template"]["spec"] for (kind, name), o in objs.items() if kind == "Deployment"}


def test_no_secret_is_rendered_so_apply_never_overwrites_the_operators(rendered):
    _, objs = rendered
    assert not [key for key in objs if key[0] == "Secret"]
    # the example is outside every kustomization
    for kustomization in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kustomization.read_text())
        listed = [(kustomization.parent / r).resolve() for r in k.get("resources", [])]
        assert SECRET_EXAMPLE.resolve() not in listed and not k.get("secretGenerator"), kustomization


def test_the_secret_example_holds_every_key_the_pods_read(rendered):
    _, objs = rendered
    secret = _secret_example()
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(secret, K8S_VERSIONS[-1], strict=True)
    assert secret["metadata"]["name"] == SECRET_NAME and set(secret["stringData"]) == SECRET_KEYS
    data = secret["stringData"]
    assert urlsplit(data["SDXL_BENTO_REDIS_URL"]).password == data["REDIS_PASSWORD"]
    assert len(data["SDXL_BENTO_INTERNAL_SECRET"]) >= 16  # the service refuses a shorter one
    read = set()
    for pod in _pod_specs(objs).values():
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref["name"] == SECRET_NAME and not ref.get("optional"), e
                    read.add(ref["key"])
                # nothing secret is ever written into a manifest
                assert not ("value" in e and re.search(r"PASSWORD|SECRET|REDIS_URL|AUTH", e["name"])), e
            assert not [f for f in c.get("envFrom", []) if "secretRef" in f]  # only named keys
        for v in pod.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] == SECRET_NAME
                read |= {i["key"] for i in v["secret"]["items"]}
    assert read == SECRET_KEYS  # every key is used, none is missing


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args and env values."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value)


def _container_env(c: dict, secret: dict) -> dict[str, str]:
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = _expand(e["value"], env)
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = secret["stringData"][e["valueFrom"]["secretKeyRef"]["key"]]
    return env


def test_redis_requires_the_password_from_the_secret(rendered, tmp_path):
    _, objs = rendered
    secret = _secret_example()
    (c,) = objs["Deployment", "sdxl-bento-redis"]["spec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert refs["REDIS_PASSWORD"] == {"name": SECRET_NAME, "key": "REDIS_PASSWORD"}
    assert refs["REDISCLI_AUTH"] == refs["REDIS_PASSWORD"]  # the probe's redis-cli authenticates
    args = c["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"  # expanded by Kubernetes, not a literal
    env = _container_env(c, secret)
    expanded = [_expand(a, env) for a in args]
    assert expanded[args.index("--requirepass") + 1] == secret["stringData"]["REDIS_PASSWORD"]
    probe = c["readinessProbe"]["exec"]["command"]
    assert "redis-cli ping" in probe[-1] and "PONG" in probe[-1]  # redis-cli exits 0 on NOAUTH as well
    server = shutil.which("redis-server")
    if server is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server is not installed: checked the manifest only")
    # the rendered arguments on a real Redis: no password, no entry; the service's URL and the probe get in
    import socket
    import time

    import redis as redis_mod

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, *expanded, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = urlsplit(secret["stringData"]["SDXL_BENTO_REDIS_URL"])
        url = url._replace(netloc=f":{url.password}@127.0.0.1:{port}").geturl()
        client = redis_mod.Redis.from_url(url, socket_connect_timeout=1)
        for _ in range(50):
            try:
                assert client.ping()
                break
            except redis_mod.ConnectionError:
                time.sleep(0.1)
        else:
            pytest.fail("redis-server did not start")
        with pytest.raises(redis_mod.AuthenticationError):
            redis_mod.Redis(host="127.0.0.1", port=port).set("k", "v")
        command = [*probe[:-1], probe[-1].replace("redis-cli", f"redis-cli -p {port}")]
        base = {"PATH": os.environ["PATH"]}
        assert subprocess.run(command, env={**base, "REDISCLI_AUTH": env["REDISCLI_AUTH"]}, timeout=10).returncode == 0
        assert subprocess.run(command, env=base, timeout=10).returncode != 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _peer_selects(peer: dict, labels: dict, *, same_namespace: bool = True) -> bool:
    """A NetworkPolicy peer with a podSelector (same namespace unless a namespaceSelector is given)."""
    if "ipBlock" in peer or ("namespaceSelector" in peer) == same_namespace:
        return False
    return _selects(peer.get("podSelector", {}).get("matchLabels", {}), labels)


def _ports(rule: dict) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


def test_network_policies_admit_only_what_the_service_needs(rendered):
    _, objs = rendered
    server = objs["Deployment", "sdxl-bento"]["spec"]["template"]
    redis = objs["Deployment", "sdxl-bento-redis"]["spec"]["template"]
    server_labels, redis_labels = server["metadata"]["labels"], redis["metadata"]["labels"]
    (server_c,), (redis_c,) = server["spec"]["containers"], redis["spec"]["containers"]
    redis_port = _container_port(redis_c, "redis")
    server_port = _container_port(server_c, "http")
    policies = [o for (kind, _), o in objs.items() if kind == "NetworkPolicy"]

    def policy_for(labels: dict) -> dict:
        (found,) = [p for p in policies if _selects(p["spec"]["podSelector"]["matchLabels"], labels)]
        return found["spec"]

    # Redis: in only from the server's pods, on Redis's port; nothing out
    spec = policy_for(redis_labels)
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and spec.get("egress", []) == []
    assert spec["ingress"]
    for rule in spec["ingress"]:
        assert rule["from"] and all(_peer_selects(p, server_labels) for p in rule["from"])
        assert not any(_peer_selects(p, redis_labels) for p in rule["from"])
        assert _ports(rule) == {("TCP", redis_port)}
    assert objs["Service", "sdxl-bento-redis"]["spec"]["ports"][0]["port"] == redis_port
    assert not _selects(spec["podSelector"]["matchLabels"], server_labels)

    # the server: in on 3000 only (clients, and the other replicas); out to Redis, each other and DNS only
    spec = policy_for(server_labels)
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert all(_ports(rule) == {("TCP", server_port)} for rule in spec["ingress"])
    assert any(r.get("from") and all(_peer_selects(p, server_labels) for p in r["from"]) for r in spec["ingress"])
    allowed = set()
    for rule in spec["egress"]:
        assert rule.get("to") and rule.get("ports"), rule  # no rule opens every address or every port
        for peer in rule["to"]:
            if _peer_selects(peer, redis_labels):
                allowed |= {("redis", p) for p in _ports(rule)}
            elif _peer_selects(peer, server_labels):
                allowed |= {("server", p) for p in _ports(rule)}
            elif _peer_selects(peer, {"k8s-app": "kube-dns"}, same_namespace=False):
                assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
                allowed |= {("dns", p) for p in _ports(rule)}
            else:
                pytest.fail(f"unexpected egress peer {peer}")
    assert allowed == {("redis", ("TCP", redis_port)), ("server", ("TCP", server_port)),
                       ("dns", ("UDP", 53)), ("dns", ("TCP", 53))}
    # the replica URL the others forward to is this pod's IP on the port the policy opens
    (replica,) = [e["value"] for e in server_c["env"] if e["name"] == "SDXL_BENTO_REPLICA_URL"]
    assert replica == f"http://$(POD_IP):{server_port}"


# -- the pods' security context, read-only root, writable paths -------------------------------------

_BENTOML_PATHS = r'''
import json, os
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.container.generate import BENTO_PATH, BENTO_UID_GID
home = BentoMLContainer.bentoml_home.get()
print(json.dumps({"home": home, "created": sorted(os.listdir(home)), "bento_path": BENTO_PATH, "uid": BENTO_UID_GID,
                  "task_db": BentoMLContainer.result_store_file.get(),
                  "prometheus": BentoMLContainer.prometheus_multiproc_dir.get()}))
'''


@pytest.fixture(scope="module")
def bentoml_paths(tmp_path_factory) -> dict:
    """Where BentoML 1.4.39 writes under BENTOML_HOME, asked of BentoML itself (in a fresh process)."""
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENTOML_")}
    out = subprocess.run([sys.executable, "-c", _BENTOML_PATHS], capture_output=True, text=True, timeout=120,
                         env={**env, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("home", "task_db", "prometheus"):
        got[key] = str(PurePosixPath(got[key]).relative_to(home)) if key != "home" else "."
    return got


def _covering_mount(path: str, mounts: list[dict]) -> dict | None:
    """The volume mount a path lives on: the one with the longest mountPath that is the path or above it."""
    p = PurePosixPath(path)
    found = [m for m in mounts if p == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in p.parents]
    return max(found, key=lambda m: len(m["mountPath"]), default=None)


def test_pods_run_unprivileged_without_a_service_account_token(rendered):
    _, objs = rendered
    for name, pod in _pod_specs(objs).items():
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["enableServiceLinks"] is False, name  # no SDXL_BENTO_* variables from Service names
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged"), name


def test_server_writes_only_to_volumes(rendered, bentoml_paths):
    """Every path the service, BentoML, torch and Triton write at run time is on a writable volume; the
    Bento (code and baked models, read from BENTO_PATH/models) is not hidden by any of them."""
    from sdxl_bento.settings import Settings

    _, objs = rendered
    pod = objs["Deployment", "sdxl-bento"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {**objs["ConfigMap", "sdxl-bento-config"]["data"], **_container_env(c, _secret_example())}
    settings = Settings(_env_file=None, **{k.removeprefix("SDXL_BENTO_").lower(): v for k, v in env.items()
                                           if k.startswith("SDXL_BENTO_")})
    home, bentoml_home = PurePosixPath(env["HOME"]), PurePosixPath(env["BENTOML_HOME"])
    assert bentoml_paths["uid"] == pod["securityContext"]["runAsUser"]  # the image's user, whose home is HOME
    assert home == PurePosixPath(bentoml_paths["bento_path"]).parent
    written = {
        "/tmp": "Python temp files, Inductor's default cache, gcc output for Triton's launchers",
        str(bentoml_home / bentoml_paths["task_db"]): "BentoML's task database (and its -wal, -shm)",
        str(bentoml_home / bentoml_paths["prometheus"]): "BentoML's Prometheus multiprocess folder",
        **{str(bentoml_home / d): "created by BentoML at start" for d in bentoml_paths["created"]},
        str(home / ".triton"): "Triton's home",
        str(home / ".cache"): "torch's kernel cache, Hugging Face",
        env["CUDA_CACHE_PATH"]: "the CUDA driver's JIT cache",
        str(settings.image_dir): "the image store",
        str(settings.state_dir): "the task journal, audit log",
        str(settings.compile_cache_dir): "Inductor's and Triton's kernel cache",
        "/dev/shm": "shared memory",
    }
    assert {"bentos", "models", "envs", "tmp"} <= set(bentoml_paths["created"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path, what in written.items():
        mount = _covering_mount(path, c["volumeMounts"])
        assert mount is not None, f"{path} ({what}) is on the read-only root"
        assert not mount.get("readOnly"), f"{path} ({what}) is on a read-only mount"
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume, (path, volume)
    # the Bento stays visible: no mount at or above it, and BENTOML_HOME is not inside it
    bento = PurePosixPath(bentoml_paths["bento_path"])
    assert _covering_mount(str(bento / "models"), c["volumeMounts"]) is None
    assert bento not in bentoml_home.parents and bentoml_home != bento
    assert c["args"][0] == "serve"  # the entrypoint serves $BENTO_PATH, whose models/ it reads
    # emptyDirs are bounded: a runaway writer evicts its pod, not the node
    assert all(volumes[m["name"]]["emptyDir"].get("sizeLimit") for m in c["volumeMounts"]
               if "emptyDir" in volumes[m["name"]])


def test_grace_period_covers_prestop_and_the_services_grace(rendered):
    _, objs = rendered
    deploy = objs["Deployment", "sdxl-bento"]
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    grace = float(objs["ConfigMap", "sdxl-bento-config"]["data"]["SDXL_BENTO_SHUTDOWN_GRACE_S"])
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = int(command[1])
    assert pre_stop >= 5  # endpoints (kube-proxy, ingress controllers) need a moment to drop the pod
    # the kubelet counts the preStop hook inside the grace period, then SIGTERM, then SIGKILL at its end
    assert pre_stop + grace + EXIT_MARGIN_S <= pod["terminationGracePeriodSeconds"]
    # once /readyz answers 503 the pod leaves the endpoints within a few seconds
    ready = c["readinessProbe"]
    assert ready["httpGet"]["path"] == "/readyz" and ready.get("successThreshold", 1) == 1
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 5
    assert ready["timeoutSeconds"] <= pre_stop
    # rolling updates: the new pod is ready before an old one goes; the rollout outlives a slow start
    rolling = deploy["spec"]["strategy"]["rollingUpdate"]
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    startup = c["startupProbe"]
    assert deploy["spec"]["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]


# -- systemd ------------------------------------------------------------------------------------

def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), ...]}: keys may repeat, backslash continues a line."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path.name}: {line!r} outside a section"
        current.append((key.strip(), value.strip()))
    return sections


def _one(entries: list[tuple[str, str]], key: str) -> str:
    (value,) = [v for k, v in entries if k == key]
    return value


def _seconds(value: str) -> float:
    """A systemd time span (``120``, ``2min``, ``1min 30s``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts and "infinity" not in value, value
    return sum(float(n) * units[u] for n, u in parts)


UNITS = ("sdxl-bento.service", "sdxl-bento@.service")


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_unit_runs_bentoml_serve_with_a_graceful_stop_and_hardening(unit):
    from sdxl_bento.settings import Settings

    service = parse_unit(DEPLOY / "systemd" / unit)["Service"]
    assert _one(service, "User") == "sdxl-bento" and _one(service, "WorkingDirectory") == "/opt/sdxl-bento"
    assert ("EnvironmentFile", "/etc/sdxl-bento/env") in service
    argv = _one(service, "ExecStart").split()
    serve = argv.index("/opt/sdxl-bento/.venv/bin/bentoml")
    assert argv[serve + 1:serve + 3] == ["serve", "service:SDXL"] and argv[argv.index("--port") + 1].startswith("300")
    assert _one(service, "Restart") == "on-failure"
    assert _one(service, "KillSignal") == "SIGTERM" and _one(service, "KillMode") == "mixed"
    env_file = dict(line.split("=", 1) for line in (DEPLOY / "systemd" / "env.example").read_text().splitlines()
                    if line and not line.startswith("#"))
    # SIGTERM to the arbiter only (which waits for its workers without a bound of its own); SIGKILL to
    # what is left once the service's grace and the time to exit have passed
    assert _seconds(_one(service, "TimeoutStopSec")) >= float(env_file["SDXL_BENTO_SHUTDOWN_GRACE_S"]) + EXIT_MARGIN_S
    assert not any(k in ("SendSIGKILL", "TimeoutSec", "TimeoutAbortSec") for k, _ in service)
    assert argv[0] in ("/usr/bin/env", "/opt/sdxl-bento/.venv/bin/bentoml")  # env(1) execs: bentoml is the main PID
    assert int(_one(service, "TimeoutStartSec")) >= 600
    for key in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                "RestrictSUIDSGID", "CapabilityBoundingSet", "SystemCallFilter"):
        assert any(k == key for k, _ in service), key
    assert _one(service, "ProtectSystem") == "strict" and _one(service, "NoNewPrivileges") == "yes"
    assert not any(k == "PrivateDevices" for k, _ in service)  # would hide /dev/nvidia*
    # the settings in the example environment file are ones the service knows, with values it accepts
    fields = {k.removeprefix("SDXL_BENTO_").lower(): v for k, v in env_file.items()}
    Settings(_env_file=None, **fields)


def test_per_gpu_unit_pins_one_gpu_and_separates_state():
    argv = _one(parse_unit(DEPLOY / "systemd" / "sdxl-bento@.service")["Service"], "ExecStart").split()
    assert argv[0] == "/usr/bin/env"  # set last: the environment file cannot override them
    env = dict(a.split("=", 1) for a in argv[1:argv.index("/opt/sdxl-bento/.venv/bin/bentoml")])
    assert env["CUDA_VISIBLE_DEVICES"] == "%i" and env["SDXL_BENTO_WORKERS"] == "1"
    assert "%i" in env["SDXL_BENTO_STATE_DIR"] and "%i" in env["BENTOML_RESULT_STORE"]
    assert argv[-1] == "300%i"


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package)")
    bentoml = Path(sys.executable).parent / "bentoml"  # verify wants ExecStart's program to exist
    text = (DEPLOY / "systemd" / unit).read_text().replace("/opt/sdxl-bento/.venv/bin/bentoml", str(bentoml))
    target = tmp_path / unit.replace("@.", "@1.")  # a template is verified as an instance
    target.write_text(text)
    out = subprocess.run([analyze, "verify", str(target)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    problems = [line for line in (out.stdout + out.stderr).splitlines() if target.name in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


# -- several GPUs: what BentoML 1.4.39 gives each worker ----------------------------------------

_PROBE = r'''
import json, sys
sys.path.insert(0, ".")
import bentoml._internal.utils.circus as circus_utils
from _bentoml_impl.server import allocator

class Captured(Exception):
    pass

def capture(**kwargs):
    raise Captured(kwargs["watchers"])

# two fake GPUs, ids 0 and 1, as BentoML's resource discovery (NVML) would report them
allocator.system_resources = lambda: {"cpu": 16, "memory": 64 << 30, "nvidia.com/gpu": [0, 1]}
circus_utils.create_standalone_arbiter = capture  # stop serve_http just before it starts processes
from fake_service import Fake
from _bentoml_impl.server.serving import serve_http
Fake.inject_config()
try:
    serve_http(Fake, port=3999)
except Captured as exc:
    (watcher,) = [w for w in exc.args[0] if w.name == "service"]
    print(json.dumps({"workers": watcher.numprocesses, "env": watcher.env, "copy_env": watcher.copy_env,
                      "args": list(watcher.args)}))
'''

_FAKE_SERVICE = '''
import bentoml

@bentoml.service(name="sdxl", workers=1)
class Fake:
    @bentoml.api
    def ping(self) -> str:
        return "pong"
'''


def _bentoml_workers(tmp_path: Path, **env: str) -> dict:
    """What BentoML's serve_http would start for a service named sdxl, in a fresh process (config is global)."""
    (tmp_path / "fake_service.py").write_text(_FAKE_SERVICE)
    (tmp_path / "probe.py").write_text(_PROBE)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("BENTOML_CONFIG", "CUDA_VISIBLE_DEVICES", "SDXL_BENTO_"))}
    out = subprocess.run([sys.executable, "probe.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**base, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bentoml_gives_every_worker_all_the_gpus_so_the_service_must_pick_one(tmp_path):
    """deploy/bentoml-multi-gpu.yaml on a 2-GPU machine: two workers, both with CUDA_VISIBLE_DEVICES=0,1.

    BentoML 1.4.39 (_bentoml_impl/server/allocator.py) assigns the service's GPUs once, to all its
    workers; it does not pin a worker to a device. Each worker knows its index ($(CIRCUS.WID), 1-based,
    as bentoml.server_context.worker_index), which is what a per-worker device choice can use
    (deploy/multi-gpu.md).
    """
    got = _bentoml_workers(tmp_path, BENTOML_CONFIG=str(DEPLOY / "bentoml-multi-gpu.yaml"))
    assert got["workers"] == 2
    assert got["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"  # the same for both workers: one env per watcher
    args = got["args"]
    assert args[args.index("--worker-id") + 1] == "$(CIRCUS.WID)"


def test_one_server_per_gpu_sees_exactly_its_gpu(tmp_path):
    """The sdxl-bento@N units: CUDA_VISIBLE_DEVICES=N set before BentoML starts turns its allocation off,
    and the one worker inherits N: one device per worker (even with a GPU reserved in BentoML's config)."""
    options = "services.sdxl.workers=1 services.sdxl.resources.gpu=1"
    for gpu in ("0", "1"):
        got = _bentoml_workers(tmp_path, CUDA_VISIBLE_DEVICES=gpu, BENTOML_CONFIG_OPTIONS=options)
        assert got["workers"] == 1
        assert got["copy_env"] is True and got["env"]["CUDA_VISIBLE_DEVICES"] == gpu  # inherited, not reassigned
    # without it, BentoML would put every such server on the first GPU
    assert _bentoml_workers(tmp_path, BENTOML_CONFIG_OPTIONS=options)["env"]["CUDA_VISIBLE_DEVICES"] == "0"
