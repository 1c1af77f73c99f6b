"""`pipeinfer up / status / down / plan`: a deployment from a YAML spec.

`up` starts the deployment's driver (coordinator + gateway, which places the
stage actors) as a detached process, waits for /health, prints the endpoint
and the stage map, and records what it started in a state file, so that
`down` stops exactly that and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from cluster.layout import format_layout, format_table, plan_layout
from cluster.spec import ClusterSpec, GatewaySpec, SpecError, load_spec
from compute.model_source import cache_dir
from pipeline.config import EngineConfig

READY_TIMEOUT_S = 900
DOWN_MARGIN_S = 20  # beyond the grace period, for the driver to stop its stages


@dataclass(slots=True)
class Deployment:
    name: str
    pid: int
    url: str
    spec_path: str
    log_path: str


def state_path(name: str) -> Path:
    return cache_dir() / "deployments" / f"{name}.json"


def read_deployment(name: str) -> Deployment:
    path = state_path(name)
    if not path.exists():
        raise SpecError(f"no deployment named {name!r} is up (no {path})")
    return Deployment(**json.loads(path.read_text()))


def engine_config(spec: ClusterSpec, show_progress: bool = False) -> EngineConfig:
    layouts = plan_layout(spec, show_progress)
    draft, _, mode, defaulted = spec.chosen()
    return EngineConfig(
        model=spec.model, draft=draft, num_stages=len(layouts), dtype=spec.dtype, device=spec.device,
        quantize=spec.quantize, draft_cpus=spec.draft_cpus, draft_resources=dict(spec.draft_resources),
        draft_stage=spec.draft_stage,
        transport=spec.transport, ray_address=spec.ray.address, kv_budget_bytes=spec.kv_budget_bytes,
        stage_plans=tuple(layout.plan for layout in layouts),
        placement_strategy="STRICT_SPREAD" if spec.ray.placement == "spread" else "PACK",
        speculation=spec.speculation.to_config(mode), defaulted=defaulted,
    )


def plan(spec_path: str) -> str:
    spec = load_spec(spec_path)
    draft, _, mode, _ = spec.chosen()
    return f"{spec.name}: {spec.model}, draft {draft}, mode {mode.value}, {spec.transport} transport\n" + \
        format_layout(plan_layout(spec, show_progress=True))


def up(spec_path: str, foreground: bool) -> int:
    spec = load_spec(spec_path)
    print(plan(spec_path), flush=True)
    if foreground:
        return serve_spec(spec)
    if state_path(spec.name).exists() and _is_running(read_deployment(spec.name).pid):
        raise SpecError(f"deployment {spec.name!r} is already up; `pipeinfer down --name {spec.name}` first")
    log_path = state_path(spec.name).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cluster.cli", "up", str(Path(spec_path).resolve()), "--foreground"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
    url = f"http://{_client_host(spec.gateway.host)}:{spec.gateway.port}"
    deployment = Deployment(spec.name, proc.pid, url, str(Path(spec_path).resolve()), str(log_path))
    state_path(spec.name).write_text(json.dumps(asdict(deployment)))
    health = _wait_healthy(deployment, proc)
    print(f"\n{spec.name} is up: {url}/v1  (logs: {log_path})")
    print(format_stage_map(health))
    return 0


def serve_spec(spec: ClusterSpec) -> int:
    from cluster.serve import serve, served_name
    from server.settings import ServerSettings

    api_keys = tuple(os.environ[e] for e in spec.gateway.api_key_envs if os.environ.get(e))
    missing = [e for e in spec.gateway.api_key_envs if not os.environ.get(e)]
    if missing:
        raise SpecError(f"gateway.api_key_envs: {', '.join(missing)} not set in the environment")
    g = spec.gateway
    settings = ServerSettings(
        served_model_name=g.served_model_name or served_name(spec.model), api_keys=api_keys,
        max_body_bytes=g.max_body_bytes, max_header_bytes=g.max_header_bytes, max_headers=g.max_headers,
        max_running_requests=g.max_running, max_waiting_requests=g.max_waiting, shutdown_grace_s=g.shutdown_grace_s)
    serve(engine_config(spec, show_progress=True), host=g.host, port=g.port, settings=settings)
    return 0


def status(name: str) -> int:
    deployment = read_deployment(name)
    if not _is_running(deployment.pid):
        print(f"{name}: the driver (pid {deployment.pid}) is not running; see {deployment.log_path}")
        return 1
    health = httpx.get(deployment.url + "/health", timeout=30).json()
    metrics = httpx.get(deployment.url + "/metrics", timeout=30).text
    running = _sample(metrics, "pipeinfer:num_requests_running")
    waiting = _sample(metrics, "pipeinfer:num_requests_waiting")
    print(f"{name}: {health['status']} at {deployment.url}/v1 (pid {deployment.pid}); "
          f"requests running {running:g}, waiting {waiting:g}")
    print(format_stage_map(health))
    return 0 if health["status"] == "ok" else 1


def down(name: str) -> int:
    """SIGTERM to the driver alone: it drains its requests and stops what it
    started (a signal to its whole group would kill the private Ray under
    the requests it is draining). SIGKILL for the group if it overstays."""
    deployment = read_deployment(name)
    if _is_running(deployment.pid):
        os.kill(deployment.pid, signal.SIGTERM)
        deadline = time.monotonic() + _shutdown_grace_s(deployment) + DOWN_MARGIN_S
        while _is_running(deployment.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _is_running(deployment.pid):
            os.killpg(deployment.pid, signal.SIGKILL)  # its own session: the driver and what it spawned
    state_path(name).unlink(missing_ok=True)
    print(f"{name} is down")
    return 0


def _shutdown_grace_s(deployment: Deployment) -> float:
    try:
        return load_spec(deployment.spec_path).gateway.shutdown_grace_s
    except SpecError:  # the file changed since `up`: assume the default
        return GatewaySpec().shutdown_grace_s


def format_stage_map(health: dict) -> str:
    rows = [("stage", "node", "layers", "weights", "kv", "sequences")]
    for s in health.get("stages", []):
        rows.append((str(s["stage"]), str(s.get("node_id", "local"))[:12], f"{s['layers'][0]}-{s['layers'][1]}",
                     f"{s['parameter_bytes'] / 1e6:.0f} MB", f"{s['kv_bytes'] / 1e6:.1f} MB", str(s["num_sequences"])))
    draft = health.get("draft") or {}
    if draft.get("runs_on") == "ray actor":
        rows.append(("draft", draft["node_id"][:12], "-", "-", "-", "-"))
    return format_table(rows)


def _wait_healthy(deployment: Deployment, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            state_path(deployment.name).unlink(missing_ok=True)
            tail = Path(deployment.log_path).read_text()[-3000:]
            raise SpecError(f"the deployment exited (status {proc.returncode}) before it was healthy:\n{tail}")
        try:
            response = httpx.get(deployment.url + "/health", timeout=5)
            health = response.json()
        except (httpx.HTTPError, ValueError):  # not listening yet
            health = {}
        if health.get("status") == "ok":
            return health
        if health.get("status") == "failed":  # loading failed: it will never be healthy
            down(deployment.name)
            raise SpecError(f"the deployment failed to load: {health.get('detail')}\n(see {deployment.log_path})")
        time.sleep(0.5)
    raise SpecError(f"not healthy after {READY_TIMEOUT_S} s; see {deployment.log_path}")


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return True


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
