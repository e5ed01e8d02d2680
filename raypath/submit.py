"""Running raypath on a Ray cluster as Ray jobs: ``raypath submit``.

A thin layer over :class:`ray.job_submission.JobSubmissionClient` (the same
REST API ``ray job submit`` uses).  What it adds:

- **job specs**: small YAML files in ``jobs/`` that name an entrypoint (a
  ``raypath`` command with ``${VAR}`` placeholders), its runtime environment
  and the resources of the driver, so a stage runs on a cluster with one
  command and the same settings every time;
- **address and token from the environment**: ``--address`` or
  ``RAY_ADDRESS`` (the dashboard URL, ``http://HEAD:8265``); a token-auth
  cluster's token from ``RAY_AUTH_TOKEN`` (or ``RAY_AUTH_TOKEN_PATH``, or
  ``~/.ray/auth_token`` unless ``RAY_AUTH_MODE=disabled``, as the ray CLI does).
  The token is sent as a bearer header and never printed or written anywhere.

Job spec format (all keys but ``entrypoint`` optional)::

    description: Tile every slide of a workspace.
    entrypoint: raypath tile --workdir ${WORKDIR}
    vars: {WORKDIR: null}          # defaults; null = must be given with --var
    runtime_env: runtime_env.yaml  # a file next to the spec, or a mapping
    entrypoint_num_cpus: 0         # resources reserved for the driver
    entrypoint_num_gpus: 0
    entrypoint_resources: {}
    metadata: {stage: tile}

Python API: :func:`submit_job`, :func:`wait_for_job`, :func:`job_status`,
:func:`job_logs`, :func:`stop_job`, :func:`list_jobs`, :func:`load_job_spec`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from raypath.errors import RaypathError

log = logging.getLogger(__name__)

ENV_ADDRESS = "RAY_ADDRESS"
ENV_TOKEN = "RAY_AUTH_TOKEN"

#: Job states after which nothing changes any more.
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")

_SPEC_KEYS = {
    "description",
    "entrypoint",
    "vars",
    "runtime_env",
    "entrypoint_num_cpus",
    "entrypoint_num_gpus",
    "entrypoint_memory",
    "entrypoint_resources",
    "metadata",
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class JobSpec:
    """What to run as a Ray job: the resolved form of a ``jobs/*.yaml`` file.

    Parameters
    ----------
    entrypoint
        Shell command the job runs on the cluster (``raypath <verb> ...``).
    runtime_env
        Ray runtime environment (``env_vars``, ``working_dir``, ``pip``, ...).
    entrypoint_num_cpus, entrypoint_num_gpus, entrypoint_memory, entrypoint_resources
        Resources reserved for the driver process (the stage's own Ray tasks
        request theirs separately).  ``entrypoint_memory`` is in bytes.
    metadata
        Free-form string labels shown by ``raypath submit --list``.
    description
        One line for humans.
    """

    entrypoint: str
    runtime_env: dict[str, Any] = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_memory: int | None = None
    entrypoint_resources: dict[str, float] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    description: str = ""


# --------------------------------------------------------------------------- specs


def _load_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RaypathError(f"{what} {path} does not exist; check the path") from None
    except yaml.YAMLError as e:
        raise RaypathError(f"{what} {path} is not valid YAML ({e}); fix the file") from None


def load_runtime_env(source: str | Path | dict | None, base_dir: Path | None = None) -> dict[str, Any]:
    """A runtime environment from a mapping or a YAML file.

    A relative ``working_dir`` in a file is taken relative to the current
    directory, like ``ray job submit --runtime-env`` does, so that the same
    file works with both tools from the repository root.
    """
    if source is None:
        return {}
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    doc = _load_yaml(path, "runtime environment file") or {}
    if not isinstance(doc, dict):
        raise RaypathError(f"runtime environment file {path} must hold a mapping (env_vars:, working_dir:, ...)")
    return doc


def substitute_vars(text: str, variables: dict[str, str | None], where: str) -> str:
    """Replace ``${NAME}`` placeholders; values are shell-quoted."""
    missing = sorted({m for m in _VAR.findall(text) if variables.get(m) in (None, "")})
    if missing:
        flags = " ".join(f"--var {m}=..." for m in missing)
        raise RaypathError(f"{where} needs a value for {', '.join(missing)}; pass {flags}")
    return _VAR.sub(lambda m: shlex.quote(str(variables[m.group(1)])), text)


def load_job_spec(path: str | Path, variables: dict[str, str] | None = None) -> JobSpec:
    """Read a job spec YAML file and fill in its ``${VAR}`` placeholders.

    Parameters
    ----------
    path
        A ``jobs/*.yaml`` file.
    variables
        Values for the placeholders; they override the spec's ``vars``.

    Raises
    ------
    RaypathError
        Unknown keys, a missing entrypoint or a placeholder without a value.
    """
    path = Path(path)
    doc = _load_yaml(path, "job spec")
    if not isinstance(doc, dict) or not doc.get("entrypoint"):
        raise RaypathError(f"job spec {path} needs an 'entrypoint:' (e.g. 'raypath tile --workdir ${{WORKDIR}}')")
    unknown = sorted(set(doc) - _SPEC_KEYS)
    if unknown:
        raise RaypathError(
            f"job spec {path} has unknown keys {unknown}; allowed: {sorted(_SPEC_KEYS)}"
        )
    values: dict[str, str | None] = {k: (None if v is None else str(v)) for k, v in (doc.get("vars") or {}).items()}
    values.update(variables or {})
    unused = sorted(set(variables or {}) - set(_VAR.findall(doc["entrypoint"])))
    if unused:
        raise RaypathError(f"job spec {path} has no placeholder for --var {', '.join(unused)}; check the name")
    runtime_env = load_runtime_env(doc.get("runtime_env"), base_dir=path.parent)
    return JobSpec(
        entrypoint=substitute_vars(" ".join(str(doc["entrypoint"]).split()), values, f"job spec {path}"),
        runtime_env=runtime_env,
        entrypoint_num_cpus=doc.get("entrypoint_num_cpus"),
        entrypoint_num_gpus=doc.get("entrypoint_num_gpus"),
        entrypoint_memory=doc.get("entrypoint_memory"),
        entrypoint_resources=doc.get("entrypoint_resources") or None,
        metadata={str(k): str(v) for k, v in (doc.get("metadata") or {}).items()},
        description=str(doc.get("description") or ""),
    )


def refuse_secrets(runtime_env: dict[str, Any]) -> None:
    """Raise when a runtime environment would carry a secret.

    A job's ``runtime_env`` is shown by ``ray job list``/the dashboard to anyone
    who can reach the cluster and is written to Ray's logs on disk, so
    credentials must come from the nodes (IAM role, IRSA, a Kubernetes
    secret in the pod spec: ``cluster/README.md``), never from here.
    """
    from raypath.io.storage import _is_secret_key

    env_vars = runtime_env.get("env_vars") or {}
    bad = sorted(k for k in env_vars if _is_secret_key(k))
    if bad:
        raise RaypathError(
            f"the job's environment would carry the secret {', '.join(bad)}: a runtime_env is visible to anyone "
            "who can list jobs and is written to Ray's logs; remove it and give the cluster's nodes the "
            "credential (IAM role, IRSA or a Kubernetes secret, see cluster/README.md)"
        )


# --------------------------------------------------------------------------- client


def resolve_address(address: str | None = None) -> str:
    """The dashboard URL: ``address``, else ``$RAY_ADDRESS``; ``http://`` added if missing."""
    addr = address or os.environ.get(ENV_ADDRESS)
    if not addr:
        raise RaypathError(
            "no Ray cluster address; pass --address http://HEAD:8265 or set RAY_ADDRESS "
            "(for KubeRay: kubectl port-forward svc/raypath-head-svc 8265:8265)"
        )
    if addr.startswith("ray://"):
        raise RaypathError(
            f"--address {addr} is a Ray Client address; jobs are submitted to the dashboard: "
            "use http://HEAD:8265"
        )
    if "://" not in addr:
        addr = "http://" + addr
    return addr.rstrip("/")


def auth_token() -> str | None:
    """The cluster token, looked up like the ``ray`` CLI does: ``$RAY_AUTH_TOKEN``,
    else the file in ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (unless
    ``RAY_AUTH_MODE=disabled``).  ``None`` when there is none."""
    token = os.environ.get(ENV_TOKEN, "").strip()
    if token:
        return token
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip() or None
        except OSError:
            raise RaypathError(
                f"cannot read the Ray auth token file {path}; set RAY_AUTH_TOKEN or fix RAY_AUTH_TOKEN_PATH"
            ) from None
    default = Path.home() / ".ray" / "auth_token"
    if mode != "disabled" and default.is_file():
        return default.read_text().strip() or None
    if mode == "token":
        raise RaypathError(
            "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or run "
            "`ray get-auth-token --generate`"
        )
    return None


def auth_headers() -> dict[str, str]:
    """Bearer header for a token-auth cluster (empty without a token)."""
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(address: str | None = None):
    """A :class:`~ray.job_submission.JobSubmissionClient` for the cluster.

    Raises
    ------
    RaypathError
        The address is missing or the cluster does not answer.
    """
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url, headers=auth_headers() or None)
    except Exception as e:  # the client raises ConnectionError/RuntimeError/ValueError
        msg = str(e).replace(auth_token() or "\0", "***")
        raise RaypathError(
            f"cannot reach the Ray job server at {url} ({msg}); check that the head is up, the "
            "dashboard port (8265) is reachable, and RAY_AUTH_TOKEN is set for a token-auth cluster"
        ) from None


def submit_job(
    spec: JobSpec | str,
    address: str | None = None,
    *,
    working_dir: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    submission_id: str | None = None,
    client=None,
) -> str:
    """Submit a job; return its submission id.

    Parameters
    ----------
    spec
        A :class:`JobSpec` or an entrypoint command string.
    address
        Dashboard URL; ``None`` = ``$RAY_ADDRESS``.
    working_dir
        Local folder uploaded with the job (its cwd on the cluster).  Use it
        to run code that is not in the cluster image.
    runtime_env
        Merged over the spec's runtime environment (``env_vars`` merged key by key).
    submission_id
        Own id for the job (unique per cluster); ``None`` = Ray generates one.
    """
    if isinstance(spec, str):
        spec = JobSpec(entrypoint=spec)
    env = dict(spec.runtime_env)
    for k, v in (runtime_env or {}).items():
        if k == "env_vars":
            env["env_vars"] = {**env.get("env_vars", {}), **v}
        else:
            env[k] = v
    if working_dir:
        if not Path(working_dir).is_dir():
            raise RaypathError(f"--working-dir {working_dir} is not a folder")
        env["working_dir"] = str(working_dir)
    refuse_secrets(env)
    client = client or job_client(address)
    kw: dict[str, Any] = dict(
        entrypoint=spec.entrypoint,
        runtime_env=env or None,
        submission_id=submission_id,
        metadata=spec.metadata or None,
        entrypoint_num_cpus=spec.entrypoint_num_cpus,
        entrypoint_num_gpus=spec.entrypoint_num_gpus,
        entrypoint_memory=spec.entrypoint_memory,
        entrypoint_resources=spec.entrypoint_resources,
    )
    job_id = client.submit_job(**{k: v for k, v in kw.items() if v is not None})
    log.debug("submitted %s: %s", job_id, spec.entrypoint)
    return job_id


def job_status(job_id: str, address: str | None = None, *, client=None) -> str:
    """The job's state: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    client = client or job_client(address)
    return str(client.get_job_status(job_id).value)


def job_info(job_id: str, address: str | None = None, *, client=None):
    """Ray's :class:`JobDetails` (status, message, entrypoint, times, driver node)."""
    client = client or job_client(address)
    return client.get_job_info(job_id)


def job_logs(job_id: str, address: str | None = None, *, client=None) -> str:
    """Everything the job's driver has printed so far."""
    client = client or job_client(address)
    return client.get_job_logs(job_id)


def stop_job(job_id: str, address: str | None = None, *, client=None) -> bool:
    """Ask the cluster to stop a job; ``False`` if it had already finished."""
    client = client or job_client(address)
    return bool(client.stop_job(job_id))


def list_jobs(address: str | None = None, *, client=None) -> list:
    """All jobs the cluster knows, oldest first (Ray's ``JobDetails``)."""
    client = client or job_client(address)
    jobs = client.list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0)


def follow_logs(job_id: str, address: str | None = None, *, out: Callable[[str], Any] | None = None, client=None) -> None:
    """Stream the job's logs to ``out`` (stdout) until the job ends."""
    client = client or job_client(address)
    write = out or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(_tail())


def wait_for_job(
    job_id: str,
    address: str | None = None,
    *,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
    client=None,
) -> str:
    """Poll until the job reaches a terminal state; return that state.

    Raises
    ------
    RaypathError
        ``timeout_s`` passed first (the job keeps running; stop it with
        ``raypath submit --stop ID``).
    """
    client = client or job_client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = job_status(job_id, client=client)
        if state in TERMINAL_STATES:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise RaypathError(
                f"job {job_id} still {state} after {timeout_s:.0f} s; follow it with "
                f"`raypath submit --logs {job_id}` or stop it with `raypath submit --stop {job_id}`"
            )
        time.sleep(poll_s)


# --------------------------------------------------------------------------- CLI


def _parse_vars(items: list[str] | None, flag: str = "--var") -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RaypathError(f"{flag} {item!r} must look like NAME=VALUE")
        out[key] = value
    return out


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="dashboard URL of the cluster [default: $RAY_ADDRESS]")
    p.add_argument("--var", action="append", metavar="NAME=VALUE", help="value for a ${NAME} in the spec (repeatable) [default: none]")
    p.add_argument("--runtime-env", metavar="FILE.yaml", help="runtime environment file (e.g. jobs/runtime_env.yaml) [default: none]")
    p.add_argument("--env", action="append", metavar="NAME=VALUE",
                   help="extra environment variable for the job (repeatable; visible in the job's info: no secrets) [default: none]")
    p.add_argument("--working-dir", metavar="PATH", help="local folder to upload as the job's working directory "
                   "[default: none]")
    p.add_argument("--submission-id", metavar="ID", help="own job id (unique per cluster) [default: Ray's]")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish; exit with the job's exit code (0, 2, 3, 4; 1 otherwise)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it finishes (implies --wait)")
    p.add_argument("--timeout-s", type=float, metavar="SECONDS", help="with --wait: give up waiting after this long "
                   "[default: none, wait for the job]")


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "submit",
        help="run raypath on a Ray cluster as a Ray job (submit, status, logs, stop, list)",
        description=(
            "Submit a job spec (jobs/*.yaml) or a command to a Ray cluster, or inspect its jobs. "
            "The cluster is --address or $RAY_ADDRESS (dashboard URL, http://HEAD:8265); "
            "a token-auth cluster's token is read from $RAY_AUTH_TOKEN (never printed). "
            "Arguments after `SPEC.yaml ... --` are appended to the spec's command."
        ),
        epilog=(
            "examples:\n"
            "  raypath submit jobs/demo.yaml --var WORKDIR=s3://bucket/demo --follow\n"
            "  raypath submit jobs/embed.yaml --var WORKDIR=s3://bucket/proj --wait -- --batch-size 128\n"
            "  raypath submit --wait -- raypath tile --workdir s3://bucket/proj\n"
            "  raypath submit --status ID | --logs ID | --stop ID | --list"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # REMAINDER keeps options that follow the spec file together with it; they
    # are parsed again in _cli so `SPEC.yaml --var X=1 -- --extra` works.
    p.add_argument("target", nargs=argparse.REMAINDER, metavar="SPEC.yaml [OPTIONS] [-- EXTRA ARGS] | -- COMMAND",
                   help="a job spec file, or (after --) the command to run")
    _add_options(p)
    act = p.add_mutually_exclusive_group()
    act.add_argument("--status", metavar="JOB_ID", help="print a job's state and message [default: none]")
    act.add_argument("--logs", metavar="JOB_ID", help="print a job's logs [default: none]")
    act.add_argument("--stop", metavar="JOB_ID", help="stop a job [default: none]")
    act.add_argument("--list", action="store_true", help="list the cluster's jobs")
    p.set_defaults(func=_cli)


def _split_target(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(spec file or None, extra args or command) from the REMAINDER argument."""
    target = list(args.target or [])
    if not target:
        return None, []
    if target[0] == "--":
        return None, target[1:]
    spec, rest = target[0], target[1:]
    if not spec.endswith((".yaml", ".yml")):
        raise RaypathError(
            f"{spec!r} is not a job spec (.yaml); to run a command put it after --: "
            f"raypath submit --wait -- {shlex.join(target)}"
        )
    opts, extra = (rest[: rest.index("--")], rest[rest.index("--") + 1 :]) if "--" in rest else (rest, [])
    again = argparse.ArgumentParser(prog="raypath submit SPEC.yaml", add_help=False)
    _add_options(again)
    again.parse_args(opts, namespace=args)
    return spec, extra


def _cli(args: argparse.Namespace) -> int:
    spec_path, extra = _split_target(args)
    if args.status:
        info = job_info(args.status, args.address)
        print(f"{args.status}: {info.status.value}" + (f" - {info.message}" if info.message else ""))
        return 0
    if args.logs:
        print(job_logs(args.logs, args.address), end="")
        return 0
    if args.stop:
        stopped = stop_job(args.stop, args.address)
        print(f"{args.stop}: {'stop requested' if stopped else 'already finished'}")
        return 0
    if args.list:
        for j in list_jobs(args.address):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((j.start_time or 0) / 1000))
            print(f"{j.submission_id or j.job_id}\t{j.status.value}\t{started}Z\t{j.entrypoint}")
        return 0

    variables = _parse_vars(args.var)
    if spec_path:
        spec = load_job_spec(spec_path, variables)
        if extra:
            spec.entrypoint += " " + shlex.join(extra)
    elif extra:
        if variables:
            raise RaypathError("--var fills placeholders of a job spec; with a command, write the values in it")
        spec = JobSpec(entrypoint=shlex.join(extra))
    else:
        raise RaypathError("nothing to submit: give a job spec (jobs/demo.yaml) or `-- raypath <verb> ...`")
    extra_env = load_runtime_env(args.runtime_env)
    env_vars = _parse_vars(args.env, "--env")
    if env_vars:
        extra_env["env_vars"] = {**extra_env.get("env_vars", {}), **env_vars}

    refuse_secrets({"env_vars": {**(spec.runtime_env.get("env_vars") or {}), **(extra_env.get("env_vars") or {})}})
    client = job_client(args.address)
    job_id = submit_job(spec, working_dir=args.working_dir, runtime_env=extra_env,
                        submission_id=args.submission_id, client=client)
    print(job_id, flush=True)
    if not (args.wait or args.follow):
        print(f"follow: raypath submit --logs {job_id}   status: raypath submit --status {job_id}", file=sys.stderr)
        return 0
    if args.follow:
        follow_logs(job_id, client=client)
    state = wait_for_job(job_id, timeout_s=args.timeout_s, client=client)
    info = job_info(job_id, client=client)
    print(f"{job_id}: {state}" + (f" - {info.message}" if info.message and state != "SUCCEEDED" else ""),
          file=sys.stderr)
    return job_exit_code(state, getattr(info, "driver_exit_code", None))


def job_exit_code(state: str, driver_exit_code: int | None) -> int:
    """``submit --wait``'s exit code: the job's own (0, 2, 3, 4 as for a local run), else 1."""
    if state == "SUCCEEDED":
        return 0
    if driver_exit_code in (2, 3, 4):
        return int(driver_exit_code)
    return 1
