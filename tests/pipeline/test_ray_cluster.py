"""The private Ray: lives as long as its owner (not the thread that started
it), listens on loopback only, keeps token auth on, and leaves nothing
behind, whether stopped or killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

from pipeline.ray_cluster import RayCluster
from tests.helpers import assert_gone, listening_addresses, process_tree

pytestmark = pytest.mark.integration


def ray_sessions() -> set[Path]:
    return set(Path("/tmp/ray").glob("session_*"))


def test_started_from_a_short_lived_thread_it_lives_until_stopped(tmp_path):
    sessions = ray_sessions()
    clusters: list[RayCluster] = []
    starter = threading.Thread(target=lambda: clusters.append(RayCluster.connect(None)))
    starter.start()
    starter.join(120)
    (cluster,) = clusters
    try:
        tree = process_tree(os.getpid())
        names = {p.name() for p in tree}
        assert {"gcs_server", "raylet"} <= names, names
        time.sleep(3)  # the head processes died about now when a loader thread started them
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), \
            [(p.pid, p.name()) for p in tree if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE]

        @ray.remote
        def where() -> int:
            return os.getpid()

        worker = ray.get(where.remote(), timeout=60)
        tree = process_tree(os.getpid())
        assert worker in {p.pid for p in tree}
        addresses = listening_addresses(tree)
        assert addresses and all(a in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for a in addresses), addresses
        from ray._raylet import AuthenticationMode, get_authentication_mode

        assert get_authentication_mode() == AuthenticationMode.TOKEN
        assert oct(os.stat(cluster.temp_dir / "auth_token").st_mode & 0o777) == "0o600"
        temp_dir = cluster.temp_dir
    finally:
        cluster.stop()
    assert_gone(tree, within_s=10)
    assert not temp_dir.exists() and ray_sessions() == sessions  # nothing of it is left on disk
    assert os.environ.get("RAY_AUTH_MODE") != "token"  # the environment is restored


OWNER = """
import os, sys, time
from pipeline.ray_cluster import RayCluster
import ray
cluster = RayCluster.connect(None)
@ray.remote
def pid():
    return os.getpid()
ray.get(pid.remote())
print(cluster.temp_dir, flush=True)
time.sleep(600)
"""


def test_an_owner_killed_with_sigkill_leaves_nothing_behind():
    root = Path(__file__).resolve().parents[2]
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        temp_dir = Path(owner.stdout.readline().strip())
        assert temp_dir.is_dir()
        tree = process_tree(owner.pid)
        assert {"gcs_server", "raylet"} <= {p.name() for p in tree}
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    assert_gone(tree, within_s=10)  # the reaper too, once it has reaped
    deadline = time.monotonic() + 5
    while temp_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not temp_dir.exists()


def test_joining_an_initialised_ray_never_stops_it():
    cluster = RayCluster.connect(None)
    try:
        joined = RayCluster.connect("auto")  # Ray is up in this process: used as it is
        joined.stop()
        assert ray.is_initialized() and not joined.is_private
    finally:
        cluster.stop()
    assert not ray.is_initialized()


def test_the_reaper_also_kills_what_it_was_never_told_of(tmp_path):
    """A process the owner had no time to report (started since its last
    look) names the cluster's directory on its command line: the reaper
    finds it there, kills it, and removes the directory it was writing to."""
    directory = tmp_path / "pipeinfer-ray-x"
    directory.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time, pathlib\n"
                               "d = pathlib.Path(sys.argv[1])\n"
                               "for i in range(10**6): (d / str(i)).write_text('x'); time.sleep(0.001)",
                               str(directory)])
    reaper = subprocess.Popen([sys.executable, "-m", "pipeline.reaper", str(directory)], stdin=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[2])
    reaper.stdin.close()  # the owner is gone, having reported nothing
    assert reaper.wait(15) == 0
    assert writer.wait(5) == -signal.SIGKILL
    assert not directory.exists()
