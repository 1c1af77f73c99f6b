"""The Ray that the Ray transport runs on: a private local cluster that lives
exactly as long as its owner, or a cluster someone else runs, which we only
join (and never stop: its network and its lifetime are its operator's).

A private cluster
- is started from a thread of its own that lives until stop(). Ray starts
  the GCS and the raylet with PR_SET_PDEATHSIG(SIGKILL), and on Linux the
  "parent" whose death fires it is the *thread* that forked them: started
  from a short-lived thread (the server's engine loader), they were killed
  the moment it returned, and the cluster could never restart a stage.
- listens on loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray
  take 127.0.0.1 as the node address, and every Ray listener follows it;
- keeps token authentication on, with a random token in a private file;
- keeps its session files in a private temp dir, removed on stop;
- is reaped on every exit path: stop() shuts Ray down and kills what is left
  (the raylet's agents can outlive it); a reaper process (pipeline/reaper.py)
  does the same when the owner dies without stopping, SIGKILL included.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from pipeline import reaper

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 2.0  # how often the owner tells the reaper about new processes (restarted stages)
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 15


class RayCluster:
    """connect(None) starts a private cluster; connect("auto" | "HOST:PORT")
    joins one; an already initialised Ray (a test's) is used as it is."""

    def __init__(self, private: _PrivateCluster | None, is_joined: bool) -> None:
        self._private = private
        self._is_joined = is_joined

    @classmethod
    def connect(cls, address: str | None) -> RayCluster:
        import ray

        if ray.is_initialized():
            return cls(None, is_joined=False)
        if address is not None:
            ray.init(address=address, log_to_driver=False)
            return cls(None, is_joined=True)
        return cls(_PrivateCluster(), is_joined=False)

    @property
    def is_private(self) -> bool:
        return self._private is not None

    @property
    def temp_dir(self) -> Path | None:
        return self._private.temp_dir if self._private else None

    def stop(self) -> None:
        """Stop a private cluster and everything it started; leave a joined
        cluster running (only our connection to it ends)."""
        if self._private is not None:
            self._private.stop()
            self._private = None
        elif self._is_joined:
            import ray

            ray.shutdown()
            self._is_joined = False


class _PrivateCluster:
    def __init__(self) -> None:
        # Short: Ray's unix socket paths live under it (108-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="pipeinfer-ray-", dir="/tmp"))
        token = self.temp_dir / "auth_token"
        token.touch(mode=0o600)
        token.write_text(secrets.token_urlsafe(32))
        self._env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                     "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self._saved_env = {name: os.environ.get(name) for name in self._env}
        self._reaper = _start_reaper(self.temp_dir)
        self._procs: set[reaper.Proc] = set()  # every process of the cluster seen so far
        self._started = threading.Event()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._own, name="ray-private-cluster", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S) or self._error is not None:
            self.stop()
            raise RuntimeError(f"could not start a private Ray: {self._error or 'timed out'}")
        log.info("private Ray on 127.0.0.1 (token auth, files in %s)", self.temp_dir)

    def _own(self) -> None:
        """Start Ray, then live until stop(): the head processes die with this
        thread. Meanwhile tell the reaper about every process the cluster starts."""
        import ray

        try:
            os.environ.update(self._env)
            _reload_ray_settings()  # Ray may have been imported, and read them, earlier
            # Logical CPUs only gate scheduling: advertise enough for several
            # stages on a small machine.
            ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False, _temp_dir=str(self.temp_dir))
            heads = [p.process.pid for ps in ray._private.worker._global_node.all_processes.values() for p in ps]
            self._report(heads)
        except BaseException as exc:  # reported by __init__
            self._error = exc
            return
        finally:
            self._started.set()
        while not self._stopping.wait(REPORT_INTERVAL_S):
            self._report(heads)
        self._report(heads)  # the last look: after shutdown the raylet's children are orphans
        ray.shutdown()

    def _report(self, heads: list[int]) -> None:
        new = set(reaper.descendants(heads)) - self._procs
        self._procs |= new
        try:
            self._reaper.stdin.write("".join(f"{pid} {start}\n" for pid, start in new).encode())
            self._reaper.stdin.flush()
        except (OSError, ValueError):  # the reaper is gone: stop() still kills what we saw
            pass

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(STOP_TIMEOUT_S)
        killed = reaper.kill(list(self._procs))
        if killed:
            log.info("killed %d process(es) the private Ray left behind", len(killed))
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reload_ray_settings()
        self._reaper.stdin.close()  # nothing is left for it to do
        try:
            self._reaper.wait(5)
        except subprocess.TimeoutExpired:
            self._reaper.kill()


def _reload_ray_settings() -> None:
    """Ray caches its settings (RAY_* variables) and the auth token per
    process: make it read them again, as Ray does when it enables auth itself."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR,
                                                              not ray_constants.IS_WINDOWS_OR_OSX)
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _start_reaper(temp_dir: Path) -> subprocess.Popen:
    """A process that reaps the cluster once our end of its stdin closes,
    i.e. when this process ends. Its own session: a signal for our process
    group (Ctrl-C, `pipeinfer down`) does not reach it."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.reaper", str(temp_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, start_new_session=True,
                            cwd=Path(__file__).resolve().parent.parent)
