"""Running raypath on a real Ray cluster.

Two kinds of tests:

- static checks of what users deploy: the KubeRay manifests against KubeRay's
  own CRD schemas (made strict, like ``kubectl apply --validate=strict``), the
  cluster-launcher YAML through Ray's own validator, the Dockerfile, and the
  job specs in ``jobs/`` against the real ``raypath`` CLI parser;
- a real two-node Ray cluster started with ``ray start --head`` and
  ``ray start --address``, to which jobs are submitted with ``raypath submit``.

The local cluster lives entirely in subprocesses with their own temp dir and
ports, so it never touches the in-process Ray of the ``ray_session`` fixture,
and its teardown kills only the processes it started (never ``ray stop``,
which would kill every Ray on the machine).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from raypath.errors import RaypathError

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = Path(__file__).parent / "data" / "kuberay-crds"
KUBERAY_DIR = ROOT / "cluster" / "kuberay"
AWS_YAML = ROOT / "cluster" / "aws" / "cluster.yaml"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
JOBS_DIR = ROOT / "jobs"
RAY_VERSION = "2.60.0"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------- helpers


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]


def _strict(schema):
    """Copy of an openAPIV3Schema where objects with declared properties reject
    unknown fields (a typo such as ``rayStartParam`` is silently pruned by the
    API server otherwise, and the setting is lost without a word)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if k in ("properties", "items", "additionalProperties", "anyOf", "allOf", "oneOf") else v
           for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


_SCHEMAS: dict[str, dict] = {}


def crd_schema(kind: str) -> dict:
    """Strict v1 openAPIV3Schema of the KubeRay CRD for ``kind``."""
    if kind not in _SCHEMAS:
        fname = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
        crd = yaml.load((CRD_DIR / fname).read_text(), Loader=_Loader)
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        _SCHEMAS[kind] = _strict(v1["schema"]["openAPIV3Schema"])
    return _SCHEMAS[kind]


def validate_manifest(doc: dict) -> list[str]:
    """Schema errors of one KubeRay object (empty list = valid)."""
    import jsonschema

    assert doc.get("apiVersion") == "ray.io/v1", "KubeRay objects are ray.io/v1"
    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"]))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def kuberay_manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        for doc in _load_all(path):
            out.append((path.name, doc))
    return out


def cluster_spec_of(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _containers(cluster_spec: dict):
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]
    for g in cluster_spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]["containers"]


def job_specs() -> list[Path]:
    return sorted(p for p in JOBS_DIR.glob("*.yaml") if not p.name.startswith("runtime_env"))


def _raypath_commands(entrypoint: str) -> list[list[str]]:
    """The ``raypath ...`` commands of an entrypoint (split at && / ; / ||)."""
    cmds, cur = [], []
    for tok in shlex.split(entrypoint):
        if tok in ("&&", "||", ";"):
            cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    cmds.append(cur)
    return [c for c in cmds if c]


def _check_parses(argv: list[str]) -> None:
    """Parse a ``raypath`` command with the real CLI parser; an unknown verb fails."""
    from raypath.cli import build_parser

    assert argv[0] == "raypath", f"entrypoint commands start with raypath: {argv}"
    parser = build_parser(argv[1:])
    verbs = parser._subparsers._group_actions[0].choices  # the registered verbs
    assert argv[1] in verbs, f"`raypath {argv[1]}` is not a raypath verb (known: {sorted(verbs)})"
    try:
        parser.parse_args(argv[1:])
    except SystemExit as e:  # argparse exits on unknown/invalid flags
        pytest.fail(f"`{shlex.join(argv)}` does not parse with the raypath CLI (exit {e.code})")


# --------------------------------------------------------------------------- KubeRay


def test_crds_are_the_kuberay_v1_schemas():
    for kind in ("RayCluster", "RayJob"):
        props = crd_schema(kind)["properties"]["spec"]["properties"]
        assert "rayClusterSpec" in props if kind == "RayJob" else "workerGroupSpecs" in props


@pytest.mark.parametrize("name,doc", kuberay_manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_manifest_validates_against_crd(name, doc):
    errors = validate_manifest(doc)
    assert not errors, f"{name} does not match the KubeRay CRD:\n" + "\n".join(errors[:20])


def test_strict_crd_check_catches_typos_and_wrong_types():
    """The schema check must be able to fail on the mistakes people make."""
    (_, base) = next((n, d) for n, d in kuberay_manifests() if d["kind"] == "RayCluster")
    typo = copy.deepcopy(base)
    typo["spec"]["headGroupSpec"]["rayStartParam"] = typo["spec"]["headGroupSpec"].pop("rayStartParams")
    assert any("rayStartParam" in e for e in validate_manifest(typo))
    number = copy.deepcopy(base)
    number["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert validate_manifest(number)
    container_typo = copy.deepcopy(base)
    container_typo["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    assert validate_manifest(container_typo)
    bad_mode = copy.deepcopy(base)
    bad_mode["spec"]["authOptions"]["mode"] = "password"
    assert validate_manifest(bad_mode)


def test_kuberay_cluster_shape():
    """Head does no work, GPU workers scale from zero on tainted GPU nodes,
    token auth on, S3 settings from a Secret, one image, Ray version pinned."""
    docs = kuberay_manifests()
    assert {d["kind"] for _, d in docs} == {"RayCluster", "RayJob"}
    for name, doc in docs:
        spec = cluster_spec_of(doc)
        assert spec["rayVersion"] == RAY_VERSION, name
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["authOptions"]["mode"] == "token", name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        gpu = [g for g in spec["workerGroupSpecs"]
               if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in g["template"]["spec"]["containers"])]
        assert gpu, f"{name}: no GPU worker group"
        for g in gpu:
            assert g["minReplicas"] == 0 < g["maxReplicas"], name
            assert g.get("replicas", 0) == 0, name
            tol = g["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tol), name
            for c in g["template"]["spec"]["containers"]:
                assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        images = set()
        for group, containers in _containers(spec):
            for c in containers:
                images.add(c["image"])
                env = {e["name"]: e for e in c.get("env", [])}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
                    assert key in env, f"{name}/{group}: {key} not set"
                    assert "value" not in env[key], f"{name}/{group}: {key} must come from a Secret"
                    assert env[key]["valueFrom"]["secretKeyRef"]["name"], name
        assert len(images) == 1, f"{name}: one image for all groups, got {images}"


def test_rayjobs_run_raypath_on_the_same_cluster_spec():
    clusters = [d for _, d in kuberay_manifests() if d["kind"] == "RayCluster"]
    jobs = [(n, d) for n, d in kuberay_manifests() if d["kind"] == "RayJob"]
    assert len(clusters) == 1 and jobs
    for name, job in jobs:
        # One cluster definition: a fix in raycluster.yaml must reach the jobs.
        assert job["spec"]["rayClusterSpec"] == clusters[0]["spec"], f"{name} drifted from raycluster.yaml"
        assert job["spec"]["shutdownAfterJobFinishes"] is True, name
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert isinstance(runtime_env, dict) and set(runtime_env) <= {"env_vars", "pip", "working_dir", "py_modules"}
        for argv in _raypath_commands(job["spec"]["entrypoint"]):
            _check_parses(argv)
            # Files the entrypoint takes from the image must be in the repo and copied by the Dockerfile.
            for arg in argv:
                if arg.startswith("/home/ray/raypath/"):
                    rel = arg.removeprefix("/home/ray/raypath/")
                    assert (ROOT / rel).is_file(), f"{name}: {rel} is not in the repository"
                    copied = [c for c in DOCKERFILE.read_text().splitlines() if c.startswith("COPY ")]
                    assert any(rel.startswith(shlex.split(c)[-2].rstrip("/")) for c in copied), f"{name}: {rel} not in the image"


# --------------------------------------------------------------------------- AWS, Docker


def test_aws_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(AWS_YAML.read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)  # what `ray up` runs first; raises on schema errors

    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no work on the head"
    gpu = {k: v for k, v in types.items() if v["node_config"]["InstanceType"].startswith(("g", "p"))}
    assert gpu and all(v["min_workers"] == 0 < v["max_workers"] for v in gpu.values())
    spot = [k for k, v in types.items() if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and raw["head_node_type"] not in spot, "spot workers, on-demand head"
    assert raw["max_workers"] >= max(v.get("max_workers", 0) for v in types.values())
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    assert "/home/ray/.ray/auth_token" in raw["file_mounts"]
    # One image across deployments; Ray version matches the CLI that validated it.
    kuberay_images = {c["image"] for _, d in kuberay_manifests() for _, cs in _containers(cluster_spec_of(d)) for c in cs}
    assert {raw["docker"]["image"]} == kuberay_images
    assert any("--num-cpus=0" in c for c in raw["head_start_ray_commands"])
    # A typo in the file would be caught by the same validator.
    bad = copy.deepcopy(cfg)
    bad["docker"]["run_option"] = []
    with pytest.raises(Exception):
        validate_config(bad)


def test_dockerfile_builds_from_ray_gpu_image_and_installs_raypath():
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms == [f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu"]
    copies = [shlex.split(ln)[1:] for ln in lines if ln.startswith("COPY ")]
    sources = [s for c in copies for s in c[:-1] if not s.startswith("--")]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    # setuptools needs the readme pyproject.toml names.
    import tomllib

    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    assert readme in sources
    text = DOCKERFILE.read_text()
    assert "pip install --no-deps ." in text and "raypath --help" in text
    # The build context allow-list lets exactly the copied files through.
    ignore = (ROOT / "cluster" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert {s.rstrip("/") for s in sources} <= allowed
    assert "*" in ignore, "the context must not carry .venv or data"


# --------------------------------------------------------------------------- job specs


def _dummy_vars(path: Path) -> dict[str, str]:
    doc = yaml.safe_load(path.read_text())
    return {k: f"s3://bucket/{k.lower()}" for k, v in (doc.get("vars") or {}).items() if v is None}


@pytest.mark.parametrize("path", job_specs(), ids=lambda p: p.name)
def test_job_spec_loads_and_its_commands_parse(path):
    from raypath.submit import load_job_spec

    spec = load_job_spec(path, _dummy_vars(path))
    assert "${" not in spec.entrypoint
    assert spec.runtime_env.get("env_vars", {}).get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1"
    assert spec.metadata.get("stage")
    for argv in _raypath_commands(spec.entrypoint):
        _check_parses(argv)


def test_every_stage_has_a_job_spec():
    names = {p.stem for p in job_specs()}
    assert {"synth", "ingest", "tile", "embed", "adapt", "mil", "robustness", "report", "demo", "pipeline"} <= names


@pytest.mark.parametrize("path", sorted(JOBS_DIR.glob("runtime_env*.yaml")), ids=lambda p: p.name)
def test_runtime_envs_hold_no_secrets(path):
    from raypath.io.storage import redact

    env = yaml.safe_load(path.read_text())
    assert set(env) <= {"env_vars", "working_dir", "py_modules", "pip", "excludes"}
    assert redact(env) == env, f"{path.name}: secret-looking keys; secrets come from the nodes' environment"
    assert not any(k.startswith(("AWS_", "HF_TOKEN")) for k in env.get("env_vars", {}))


def test_job_spec_placeholders(tmp_path):
    from raypath.submit import load_job_spec

    (tmp_path / "env.yaml").write_text("env_vars: {A: '1'}\n")
    spec_file = tmp_path / "x.yaml"
    spec_file.write_text(
        "entrypoint: raypath tile --workdir ${WORKDIR} --model ${MODEL}\n"
        "vars: {WORKDIR: null, MODEL: tiny-vit}\nruntime_env: env.yaml\nentrypoint_num_gpus: 1\n"
    )
    with pytest.raises(RaypathError, match=r"WORKDIR.*--var WORKDIR="):
        load_job_spec(spec_file)
    spec = load_job_spec(spec_file, {"WORKDIR": "/data/my project"})
    # A value with a space stays one argument.
    assert shlex.split(spec.entrypoint)[3] == "/data/my project"
    assert shlex.split(spec.entrypoint)[-1] == "tiny-vit"
    assert spec.runtime_env == {"env_vars": {"A": "1"}} and spec.entrypoint_num_gpus == 1
    with pytest.raises(RaypathError, match="no placeholder"):
        load_job_spec(spec_file, {"WORKDIR": "w", "WORKDRI": "typo"})
    spec_file.write_text("entrypoint: raypath tile\nresources: {GPU: 1}\n")
    with pytest.raises(RaypathError, match="unknown keys"):
        load_job_spec(spec_file)


def _submit_parser():
    """A parser with only the submit verb (independent of other stages' modules)."""
    import argparse

    from raypath import submit

    parser = argparse.ArgumentParser(prog="raypath")
    submit.add_cli(parser.add_subparsers(dest="verb"))
    return parser


def test_submit_cli_arguments():
    from raypath.submit import _split_target

    parser = _submit_parser()
    args = parser.parse_args(["submit", "jobs/tile.yaml", "--var", "WORKDIR=w", "--wait", "--", "--tile-px", "224"])
    assert _split_target(args) == ("jobs/tile.yaml", ["--tile-px", "224"])
    assert args.var == ["WORKDIR=w"] and args.wait
    args = parser.parse_args(["submit", "--follow", "--", "raypath", "tile", "--workdir", "x"])
    assert _split_target(args) == (None, ["raypath", "tile", "--workdir", "x"]) and args.follow
    args = parser.parse_args(["submit", "raypath", "tile"])
    with pytest.raises(RaypathError, match="after --"):
        _split_target(args)


def test_address_and_token_come_from_the_environment(monkeypatch, tmp_path):
    from raypath import submit

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RaypathError, match="RAY_ADDRESS"):
        submit.resolve_address()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:8265")
    assert submit.resolve_address() == "http://10.0.0.1:8265"
    assert submit.resolve_address("https://ray.example.org/") == "https://ray.example.org"
    with pytest.raises(RaypathError, match="dashboard"):
        submit.resolve_address("ray://head:10001")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-token-value")
    assert submit.auth_headers() == {"Authorization": "Bearer s3cr3t-token-value"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert submit.auth_headers() == {}
    token_file = tmp_path / "auth_token"
    token_file.write_text("from-a-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert submit.auth_headers() == {"Authorization": "Bearer from-a-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(RaypathError, match="RAY_AUTH_TOKEN_PATH"):
        submit.auth_headers()
    # The default file, as `ray start`/`ray job submit` use it, unless auth is disabled.
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit.auth_headers() == {}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(RaypathError, match="get-auth-token"):
        submit.auth_headers()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default-file-token")
    assert submit.auth_headers() == {"Authorization": "Bearer default-file-token"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.auth_headers() == {}


def test_unreachable_cluster_error_names_the_remedy_not_the_token(monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-token-value")
    args = _submit_parser().parse_args(["submit", "--address", f"127.0.0.1:{port}", "--list"])
    with pytest.raises(RaypathError) as e:
        args.func(args)
    assert f"http://127.0.0.1:{port}" in str(e.value) and "RAY_AUTH_TOKEN" in str(e.value)
    assert "s3cr3t-token-value" not in str(e.value)


# --------------------------------------------------------------------------- a real local cluster

_MARKER = "RAYPATH_TEST_CLUSTER"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of(sessions: set[int], marker: str) -> list[int]:
    """Live processes started by our ``ray start`` commands: in their sessions
    (``start_new_session``), or carrying our marker in their environment
    (processes that left the session, e.g. job drivers).  Never anything else."""
    me = os.getpid()
    tag = f"\0{_MARKER}={marker}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] == "Z":  # zombie: already dead
                continue
            hit = int(fields[3]) in sessions
            if not hit:
                with open(f"/proc/{name}/environ", "rb") as f:
                    hit = tag in b"\0" + f.read()
        except (OSError, ValueError, IndexError):
            continue
        if hit:
            out.append(int(name))
    return out


class LocalRayCluster:
    """A head and worker nodes started with ``ray start --block`` in their own
    sessions, temp dir and ports.  ``kill_node``/``shutdown`` kill exactly
    those processes (SIGKILL: a node failure, or a teardown that cannot hang)."""

    def __init__(self, venv_bin: Path):
        self.venv_bin = venv_bin
        self.run_id = uuid.uuid4().hex[:8]
        # Short: Ray's Unix socket paths live under it (108-byte limit).
        self.temp_root = Path(tempfile.mkdtemp(prefix="rpc", dir="/tmp"))
        self.nodes: dict[str, subprocess.Popen] = {}
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def _env(self, node: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
            # A killed node refuses health checks at once: declared dead after
            # 5 failed checks, 1 s apart (default 3 s).  The per-check timeout
            # stays at Ray's default so a live node on a busy machine is not
            # declared dead.
            RAY_health_check_period_ms="1000",
            PATH=f"{self.venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            **{_MARKER: f"{self.run_id}-{node}"},
        )
        return env

    def _ports(self) -> list[str]:
        flags = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "metrics-export-port", "node-manager-port", "object-manager-port"]
        return [f"--{f}={_free_port()}" for f in flags]

    def _start(self, node: str, args: list[str]) -> None:
        log = open(self.temp_root / f"{node}.log", "w")
        self.nodes[node] = subprocess.Popen(
            [str(self.venv_bin / "ray"), "start", "--block", "--disable-usage-stats",
             f"--temp-dir={self.temp_root / node}", "--object-store-memory=80000000", *self._ports(), *args],
            env=self._env(node), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()

    def _get(self, path: str):
        with urllib.request.urlopen(self.address + path, timeout=5) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        return [n for n in self._get("/api/v0/nodes")["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def _wait(self, what: str, ok, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited:\n" + self.log(name)[-3000:])
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"local Ray cluster: {what} not ready after {timeout_s} s")

    def _node_ready(self, resource: str) -> bool:
        return any(resource in n["resources_total"] for n in self.alive_nodes())

    def start_head(self, num_cpus: int = 1, timeout_s: float = 120) -> None:
        self._start("head", ["--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--num-cpus={num_cpus}",
                             f"--ray-client-server-port={_free_port()}"])
        self._wait("head", lambda: self._node_ready("node:__internal_head__"), timeout_s)

    def add_worker(self, name: str, num_cpus: int = 1, resources: dict | None = None, timeout_s: float = 120,
                   attempts: int = 3) -> None:
        """Start a worker node and wait until the GCS lists it.  Retried:
        on an overloaded machine Ray gives a raylet only 30 s to register."""
        marker = f"node_{name}"  # a resource only this node has
        for attempt in range(attempts):
            self._start(name, [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}",
                               f"--resources={json.dumps({**(resources or {}), marker: 1})}"])
            try:
                self._wait(f"worker {name}", lambda: self._node_ready(marker), timeout_s)
                return
            except RuntimeError:
                self.kill_node(name)
                if attempt == attempts - 1:
                    raise

    def log(self, node: str) -> str:
        return (self.temp_root / f"{node}.log").read_text(errors="replace")

    def kill_node(self, name: str) -> int:
        """SIGKILL every process of one node (a machine failure); returns how many."""
        proc = self.nodes.pop(name)
        pids = _pids_of({proc.pid}, f"{self.run_id}-{name}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
        return len(pids)

    def shutdown(self) -> None:
        sessions = {p.pid for p in self.nodes.values()}
        for _ in range(3):
            pids = _pids_of(sessions, self.run_id)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        for proc in self.nodes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.nodes.clear()
        shutil.rmtree(self.temp_root, ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster():
    """A head (1 CPU) and one worker node (1 CPU, custom resource
    ``worker_node``), both real ``ray start`` nodes."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("the local-cluster tests find their processes through /proc (Linux)")
    cluster = LocalRayCluster(Path(sys.executable).parent)
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_worker("worker", num_cpus=1, resources={"worker_node": 1})
        yield cluster
    finally:
        cluster.shutdown()
        assert not _pids_of(set(), cluster.run_id), "processes of the local cluster survived its teardown"


def _submit(cluster, *argv: str) -> tuple[int, str, str]:
    """``raypath submit`` in a subprocess (as a user runs it); (rc, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_ADDRESS"] = cluster.address
    p = subprocess.run([str(cluster.venv_bin / "raypath"), "submit", *argv], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.slow
def test_job_runs_across_both_nodes(local_cluster, capsys):
    """`raypath submit -- CMD` runs the command as a Ray job whose tasks reach
    the second node; status, logs and list report it."""
    script = local_cluster.temp_root / "probe.py"
    script.write_text(
        "import ray\n"
        "ray.init()\n"
        "where = ray.remote(lambda: ray.get_runtime_context().get_node_id())\n"
        "nodes = {ray.get(where.options(resources={'worker_node': 1}).remote()), ray.get_runtime_context().get_node_id()}\n"
        "print('NODES', len(nodes), len(ray.nodes()))\n"
    )
    # In-process CLI (the demo job below goes through the `raypath` executable).
    args = _submit_parser().parse_args(
        ["submit", "--address", local_cluster.address, "--follow", "--timeout-s", "300",
         "--submission-id", f"probe-{uuid.uuid4().hex[:6]}", "--", "python", str(script)])
    rc = args.func(args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    job_id = out.split()[0]
    assert job_id.startswith("probe-") and "SUCCEEDED" in err
    assert "NODES 2 2" in out  # --follow streamed the driver's output

    from raypath.submit import job_logs, job_status, list_jobs

    assert job_status(job_id, local_cluster.address) == "SUCCEEDED"
    assert "NODES 2 2" in job_logs(job_id, local_cluster.address)
    assert job_id in {j.submission_id for j in list_jobs(local_cluster.address)}


@pytest.mark.slow
def test_failed_and_stopped_jobs_are_reported(local_cluster, capsys):
    from raypath.submit import job_client, job_status, stop_job, submit_job, wait_for_job

    client = job_client(local_cluster.address)
    sleeper = submit_job("sleep 300", client=client)
    # The CLI waits for a failing job and exits with the job's own code when it is one of
    # raypath's (3: some slides failed), else 1 (in-process: no interpreter start-up).
    args = _submit_parser().parse_args(
        ["submit", "--address", local_cluster.address, "--wait", "--timeout-s", "300",
         "--", "python", "-c", "raise SystemExit(3)"])
    assert args.func(args) == 3
    assert "FAILED" in capsys.readouterr().err
    assert job_status(sleeper, client=client) in ("PENDING", "RUNNING")
    assert stop_job(sleeper, client=client)
    assert wait_for_job(sleeper, client=client, timeout_s=60) == "STOPPED"


# --------------------------------------------------------------------------- the pipeline as jobs


@pytest.fixture(scope="module")
def demo_job(local_cluster):
    """The demo pipeline (`jobs/demo-small.yaml`) submitted as one job with
    `raypath submit --wait`; (rc, stderr, workdir).  Stages write their outputs
    as they finish, so a later stage's failure still leaves slides and tiles."""
    # Under the cluster's temp dir (removed at teardown), not pytest's tmp_path:
    # pytest sessions running beside this one prune old tmp_path folders.
    workdir = local_cluster.temp_root / "demo-workdir"
    t0 = time.monotonic()
    # --no-s3: slides on the workdir's disk, so they outlive the demo (its
    # embedded S3 endpoint stops with the job) for the node-failure test.
    rc, out, err = _submit(local_cluster, str(JOBS_DIR / "demo-small.yaml"), "--var", f"WORKDIR={workdir}",
                           "--wait", "--timeout-s", "900", "--", "--no-s3")
    print(f"demo job: rc {rc} in {time.monotonic() - t0:.0f} s")
    job_id = out.split()[0] if out.split() else None
    logs = ""
    if job_id and rc != 0:
        from raypath.submit import job_logs

        logs = job_logs(job_id, local_cluster.address)
    return rc, err + logs[-4000:], workdir


@pytest.mark.slow
def test_demo_pipeline_runs_as_a_job(demo_job):
    rc, err, workdir = demo_job
    assert rc == 0, f"demo job did not succeed:\n{err}"
    summary = json.loads((workdir / "demo_summary.json").read_text())
    import pandas as pd

    slides = pd.read_parquet(workdir / "slides.parquet")
    tiles = pd.read_parquet(workdir / "tiles.parquet")
    assert summary["slides"] == len(slides) > 0 and (slides["status"] == "ok").all()
    assert summary["tiles"] == len(tiles) > 0
    feature_dir = Path(summary["features"])
    assert {p.stem for p in feature_dir.glob("*.parquet")} == set(tiles["slide_id"])
    for key in ("mil", "robustness"):
        assert key in summary, f"the demo job skipped {key}"
    for run_dir in summary["mil"].values():
        assert (Path(run_dir) / "metrics.json").exists(), run_dir
    assert (Path(summary["robustness"]) / "robustness.json").exists()
    assert Path(summary["report"]).exists()


def _alive_work_on(cluster, node_id: str) -> int:
    """Actors alive plus tasks running on one node (Ray's state API)."""
    actors = cluster._get("/api/v0/actors?limit=1000")["data"]["result"]["result"]
    tasks = cluster._get("/api/v0/tasks?limit=1000")["data"]["result"]["result"]
    return (sum(a["state"] == "ALIVE" and a.get("node_id") == node_id for a in actors)
            + sum(t["state"] == "RUNNING" and t.get("node_id") == node_id for t in tasks))


@pytest.mark.slow
def test_worker_node_killed_mid_embed_loses_and_duplicates_nothing(local_cluster, demo_job):
    """Kill the worker node while `raypath embed` runs as a job; a replacement
    node joins (what the autoscaler does after a lost spot node); the job
    succeeds and every slide's features exist exactly once, complete."""
    _, _, workdir = demo_job
    if not (workdir / "tiles.parquet").exists():
        pytest.skip("the demo job produced no tiles.parquet (see test_demo_pipeline_runs_as_a_job)")
    pytest.importorskip("raypath.embed.api")
    import pandas as pd
    import pyarrow.parquet as pq

    from raypath.submit import job_client, job_logs, job_status, wait_for_job, submit_job

    tiles = pd.read_parquet(workdir / "tiles.parquet")
    expected = {sid: set(g["tile_id"]) for sid, g in tiles.groupby("slide_id")}
    feature_dir = workdir / "features-nodefail"
    client = job_client(local_cluster.address)
    # Small batches keep the job running long enough to be killed in the middle.
    # The driver writes feature files as slides complete, which on an idle
    # machine can be one burst at the end: so "mid-run" = embedding work alive
    # on the worker node and not every slide written yet.
    job_id = submit_job(
        f"raypath embed --workdir {shlex.quote(str(workdir))} --model tiny-vit "
        f"--feature-dir {shlex.quote(str(feature_dir))} --batch-size 2 --progress-interval-s 1",
        client=client,
    )
    (worker,) = [n for n in local_cluster.alive_nodes() if "worker_node" in n["resources_total"]]
    deadline = time.monotonic() + 600
    killed = None
    while time.monotonic() < deadline:
        state = job_status(job_id, client=client)
        done = len(list(feature_dir.glob("*.parquet")))
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        if done < len(expected) and _alive_work_on(local_cluster, worker["node_id"]):
            killed = (done, local_cluster.kill_node("worker"))
            break
        time.sleep(0.2)
    assert killed, f"embed ended ({state}) before the worker node could be killed mid-run:\n" + job_logs(job_id, client=client)[-3000:]
    assert job_status(job_id, client=client) == "RUNNING", "the job finished before the node died: not a mid-run kill"
    local_cluster.add_worker("worker2", num_cpus=1, resources={"worker_node": 1})
    assert wait_for_job(job_id, client=client, timeout_s=600) == "SUCCEEDED", job_logs(job_id, client=client)[-4000:]

    files = sorted(p.name for p in feature_dir.iterdir())
    assert not [f for f in files if ".tmp" in f], f"temporary files left: {files}"
    assert {p.stem for p in feature_dir.glob("*.parquet")} == set(expected)  # one file per slide
    for sid, tile_ids in expected.items():
        got = pq.read_table(feature_dir / f"{sid}.parquet", columns=["tile_id"]).column("tile_id").to_pylist()
        assert len(got) == len(set(got)) == len(tile_ids) and set(got) == tile_ids, sid  # each tile once
    manifest = json.loads((feature_dir / "manifest.json").read_text())
    assert set(manifest["slides"]) == set(expected) and not manifest.get("failed")
    print(f"worker killed after {killed[0]}/{len(expected)} slides ({killed[1]} processes)")
