"""`pipeinfer up` on a real multi-node Ray cluster (a head and two worker
nodes on this machine), then `pipeinfer down`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from ray.cluster_utils import Cluster
from transformers import AutoTokenizer

from cluster.up import read_deployment
from tests.helpers import assert_gone, greedy_reference, process_tree

pytestmark = pytest.mark.integration

PIPEINFER = str(Path(sys.executable).parent / "pipeinfer")
SMALL_OBJECT_STORE = 100 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PIPEINFER, *args], capture_output=True, text=True, timeout=timeout, env=env)


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


@pytest.fixture
def two_node_cluster():
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "object_store_memory": SMALL_OBJECT_STORE})
    # node_a has room for stage 0 and the draft's actor beside it (draft_stage 0).
    nodes = {name: cluster.add_node(num_cpus=cpus, resources={name: 1}, object_store_memory=SMALL_OBJECT_STORE)
             for name, cpus in (("node_a", 2), ("node_b", 1))}
    cluster.wait_for_nodes()
    yield cluster, {name: node.node_id for name, node in nodes.items()}
    cluster.shutdown()


def test_up_places_stages_on_the_asked_nodes_and_down_stops_them(tmp_path, tiny_text_model, two_node_cluster):
    cluster, node_ids = two_node_cluster
    port = free_port()
    spec = tmp_path / "cluster.yaml"
    spec.write_text(f"""
name: two-nodes-test
model: {tiny_text_model}
draft: layers:1
stages:
  - layers: [0, 2]
    resources: {{node_a: 1}}
  - layers: [2, 4]
    resources: {{node_b: 1}}
ray:
  address: "{cluster.address}"
  placement: spread
gateway:
  port: {port}
  served_model_name: tiny
""")
    env = {**os.environ, "PIPEINFER_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}
    plan = cli("plan", str(spec), env=env)
    assert plan.returncode == 0, plan.stderr
    assert "0-2" in plan.stdout and "node_a=1" in plan.stdout

    # A draft asking for a node the cluster does not have: `up` fails at once, saying so, and stops its driver.
    unplaceable = tmp_path / "unplaceable.yaml"
    unplaceable.write_text(spec.read_text() + "draft_resources: {node_c: 1}\n")
    failed = cli("up", str(unplaceable), env=env)
    assert failed.returncode != 0
    assert "no node of the cluster can hold the draft's actor" in failed.stderr, failed.stdout + failed.stderr
    assert not (tmp_path / "cache" / "deployments" / "two-nodes-test.json").exists()

    up = cli("up", str(spec), env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"http://127.0.0.1:{port}/v1" in up.stdout
    try:
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()
        stages = health["stages"]
        assert [s["node_id"] for s in stages] == [node_ids["node_a"], node_ids["node_b"]]
        assert [s["layers"] for s in stages] == [[0, 2], [2, 4]]
        for s in stages:
            assert s["node_id"][:12] in up.stdout  # the printed stage map
        draft = health["draft"]  # an actor of its own, on draft_stage's node
        assert draft["runs_on"] == "ray actor" and draft["node_id"] == node_ids["node_a"]
        assert draft["pid"] not in [s["pid"] for s in stages]

        prompt = "The capital of France is"
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        text = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
        expected = tokenizer.decode(greedy_reference(tiny_text_model, tokenizer.encode(prompt), 12))
        assert text == expected

        status = cli("status", "--name", "two-nodes-test", env=env)
        assert status.returncode == 0 and "requests running" in status.stdout
        driver_pid = json.loads((tmp_path / "cache" / "deployments" / "two-nodes-test.json").read_text())["pid"]
    finally:
        down = cli("down", "--name", "two-nodes-test", env=env)
    assert down.returncode == 0, down.stderr
    assert not is_running(driver_pid)
    assert all(not is_running(s["pid"]) for s in stages), "a stage actor outlived `pipeinfer down`"
    assert not is_running(draft["pid"]), "the draft's actor outlived `pipeinfer down`"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    # Only what `up` started is gone: the cluster's own nodes still run.
    assert cluster.remaining_processes_alive()


@pytest.mark.slow
def test_local_example_then_curl_as_the_readme_says(default_model):
    """`pipeinfer up examples/local.yaml`, the README's curl, `pipeinfer down`."""
    example = Path(__file__).resolve().parents[2] / "examples" / "local.yaml"
    env = dict(os.environ)
    up = cli("up", str(example), env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        driver = psutil.Process(read_deployment("pipeinfer").pid)
        started = [driver, *process_tree(driver.pid)]  # the private Ray's processes among them
        assert {"gcs_server", "raylet"} <= {p.name() for p in started}
        assert "http://127.0.0.1:8000/v1" in up.stdout
        curl = subprocess.run(
            ["curl", "-s", "http://127.0.0.1:8000/v1/completions", "-H", "Content-Type: application/json", "-d",
             '{"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'],
            capture_output=True, text=True, timeout=120)
        assert "Paris" in json.loads(curl.stdout)["choices"][0]["text"]
    finally:
        down = cli("down", env=env)
    assert down.returncode == 0 and "pipeinfer is down" in down.stdout
    assert_gone(started, within_s=10)
