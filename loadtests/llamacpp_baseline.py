"""llama.cpp as a benchmark baseline: its `llama-server` on the GGUF our
converted model came from, the same prompts (as token ids) and max tokens,
greedy, at a given concurrency.

kinds:
  llama.cpp         plain llama.cpp
  llama.cpp-ngram   llama.cpp's own n-gram speculation (--spec-type ngram-simple:
                    where the last NGRAM_SIZE tokens occurred before, the
                    NGRAM_DRAFT_MAX that followed them are the draft)

The binary: the one given (bench's --llama-server), else `llama-server` on
PATH, else the one scripts/build-llama-cpp.sh builds (DEFAULT_BUILD_DIR/bin).
It runs as a child process in its own process group, on 127.0.0.1 and a free
port, with THREADS threads and SLOTS slots (requests served at once); it is
stopped on close() and at interpreter exit. Each request goes to its native
/completion endpoint with the prompt as token ids, streamed; every chunk is
timed from the request's send, as a streaming client sees it. llama-server
sends one event per token, also for the several tokens one speculative step
accepts: events of one decode step (the same server-side generation time)
are one chunk here, as vLLM's steps are. Prompt caching is off
(cache_prompt: false): the benchmark sends the same prompts again and again,
and pipeinfer computes every prompt.

Its output is its own: llama.cpp computes with its own kernels (and bans EOS
under ignore_eos, where our engine may emit it and go on), so its greedy text
may differ from ours; bench reports that in outputs_equal_first_mode and goes
on. A token that ends inside a multi-byte UTF-8 character is not streamed by
llama-server (its text comes with the next one): such tokens are missing from
the token ids, and counted in last_withheld_tokens.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loadtests.timing import RequestTiming

KINDS = "llama.cpp, llama.cpp-ngram"
BUILD_SCRIPT = "scripts/build-llama-cpp.sh"
# ngram-simple's own sizes: its draft length is --spec-ngram-simple-size-m
# (--spec-draft-n-max does not apply to it), and its lookup length's default,
# 12 tokens, would rarely match in prompts of a few dozen tokens.
NGRAM_SIZE = 3  # --spec-ngram-simple-size-n: as our ngram drafter's longest match
NGRAM_DRAFT_MAX = 8  # --spec-ngram-simple-size-m: tokens drafted a step at most
DEFAULT_CTX = 4096  # context per slot when none is given
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 600.0


class LlamaCppBaselineError(ValueError):
    pass


def is_llamacpp_kind(kind: str) -> bool:
    return kind == "llama.cpp" or kind.startswith("llama.cpp-")


def server_flags(kind: str) -> list[str]:
    """llama-server's flags for a baseline kind, beyond the model and sizes."""
    if kind == "llama.cpp":
        return []
    if kind == "llama.cpp-ngram":
        return ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(NGRAM_SIZE),
                "--spec-ngram-simple-size-m", str(NGRAM_DRAFT_MAX)]
    raise LlamaCppBaselineError(f"unknown baseline {kind!r}: expected one of {KINDS}")


def default_build_dir() -> Path:
    """Where scripts/build-llama-cpp.sh puts llama.cpp by default."""
    return Path(os.environ.get("PIPEINFER_CACHE") or Path.home() / ".cache" / "pipeinfer") / "llama.cpp"


def find_llama_server(given: str | os.PathLike | None = None) -> Path:
    """The llama-server binary: the one given, else on PATH, else the build script's."""
    if given is not None:
        path = Path(given).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path.resolve()
        raise LlamaCppBaselineError(f"--llama-server {given}: no such executable (build one with {BUILD_SCRIPT})")
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path).resolve()
    built = default_build_dir() / "bin" / "llama-server"
    if built.is_file() and os.access(built, os.X_OK):
        return built
    raise LlamaCppBaselineError(f"llama.cpp baselines need llama-server: none on PATH nor in {built.parent}; "
                                f"build it with {BUILD_SCRIPT} (~12 min on 2 cores) or give --llama-server PATH")


def server_version(binary: str | os.PathLike) -> str:
    """`llama-server --version`'s version line, e.g. "0.5.0-dev (build 1, commit 0c1e570)"."""
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LlamaCppBaselineError(f"{binary} --version failed: {exc}") from None
    lines = [line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("version:"):
            return line.removeprefix("version:").strip()
    if done.returncode != 0 or not lines:
        raise LlamaCppBaselineError(f"{binary} --version failed (exit {done.returncode}): {' '.join(lines[-3:])}")
    return lines[0]


def model_gguf(model_dir: Path) -> Path:
    """The GGUF a converted model directory came from: what llama-server loads."""
    from compute.model_source import gguf_source

    path = Path(model_dir)
    gguf = path if path.suffix == ".gguf" and path.is_file() else gguf_source(path)
    if gguf is None:
        raise LlamaCppBaselineError(f"llama.cpp baselines need a GGUF model: {model_dir} was not converted from one "
                                    "(give --model a .gguf file or \"default\")")
    return gguf


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaCppBaseline:
    def __init__(self, model_dir: Path, kind: str, llama_server: str | os.PathLike | None = None,
                 threads: int | None = None, slots: int = 1, ctx: int = DEFAULT_CTX,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        """ctx: the context of each slot (prompt + generated tokens)."""
        flags = server_flags(kind)  # bad kinds fail before anything else is needed
        if slots < 1 or ctx < 2 or (threads is not None and threads < 1):
            raise ValueError(f"slots, threads must be >= 1 and ctx >= 2, got {slots}, {threads}, {ctx}")
        self.kind = self.name = kind
        self.gguf = model_gguf(model_dir)
        self.binary = find_llama_server(llama_server)
        self.version = server_version(self.binary)
        self.threads = threads or default_threads()
        self.slots = slots
        self.ctx = ctx
        self.info = {"llama_cpp_version": self.version, "binary": str(self.binary), "gguf": str(self.gguf),
                     "threads": self.threads, "slots": slots, "ctx_per_slot": ctx, "flags": flags}
        source = self.binary.parent.parent / "SOURCE"  # written by the build script
        if source.is_file():
            self.info["source"] = source.read_text().strip()
        self.last_spec_decode: dict | None = None  # draft/accepted token counters over the last run()
        self.last_withheld_tokens = 0  # generated but not streamed (see the module's docstring)
        self.last_server_timings: list[dict] = []  # llama-server's own "timings" of each request of the last run()
        self._process: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        self._lock = threading.Lock()
        self._client = None
        self._port = 0
        atexit.register(self.close)
        try:
            self._start(flags, start_timeout_s)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def _start(self, flags: list[str], timeout_s: float) -> None:
        import httpx

        for attempt in range(3):  # a port taken between free_port() and the server's bind: try another
            self._port = free_port()
            command = [str(self.binary), "-m", str(self.gguf), "-t", str(self.threads), "-np", str(self.slots),
                       "-c", str(self.ctx * self.slots), "--host", "127.0.0.1", "--port", str(self._port), *flags]
            self.info["command"] = command
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_healthy(httpx, timeout_s):
                break
            if attempt == 2 or "bind" not in self.log_tail().lower():
                raise LlamaCppBaselineError(f"llama-server exited with status {self._process.returncode} before it "
                                            f"was ready: {' '.join(command)}\n{self.log_tail()}")
            self._process = None
        self._client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0),
                                    limits=httpx.Limits(max_connections=self.slots * 4 + 4))

    def _wait_healthy(self, httpx, timeout_s: float) -> bool:
        """True once /health answers 200; False if the server died; an error on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise LlamaCppBaselineError(f"llama-server did not become healthy within {timeout_s:g} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self._log.name, errors="replace") as log:
                return "".join(deque(log, maxlen=lines)).rstrip()
        except OSError:
            return ""

    def run(self, prompts: list[list[int]], max_tokens: int, concurrency: int,
            ignore_eos: bool = True) -> list[RequestTiming]:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if self._client is None:
            raise LlamaCppBaselineError("this llama.cpp baseline is closed")
        for prompt in prompts:
            if not prompt or len(prompt) + max_tokens > self.ctx:
                raise ValueError(f"a prompt of {len(prompt)} tokens + {max_tokens} tokens does not fit "
                                 f"llama-server's context of {self.ctx} a slot")
        self.last_withheld_tokens = 0
        self.last_server_timings = [{} for _ in prompts]
        with ThreadPoolExecutor(concurrency, thread_name_prefix="llama.cpp") as pool:
            timings = list(pool.map(lambda item: self._one(*item, max_tokens, ignore_eos), enumerate(prompts)))
        drafted = sum(t.get("draft_n", 0) for t in self.last_server_timings)
        accepted = sum(t.get("draft_n_accepted", 0) for t in self.last_server_timings)
        self.last_spec_decode = ({"num_draft_tokens": drafted, "num_accepted_tokens": accepted}
                                 if self.kind != "llama.cpp" else None)
        return timings

    def _one(self, index: int, prompt: list[int], max_tokens: int, ignore_eos: bool) -> RequestTiming:
        body = {"prompt": [int(t) for t in prompt], "n_predict": max_tokens, "temperature": 0, "top_k": 1,
                "stream": True, "ignore_eos": ignore_eos, "cache_prompt": False, "return_tokens": True,
                "timings_per_token": True}
        timing = RequestTiming(index)
        pending: list[int] = []  # one decode step's tokens, as they come
        pending_at, pending_step = 0.0, None
        decoded = 0  # tokens the server generated so far, streamed or not
        started = time.perf_counter()
        with self._client.stream("POST", "/completion", json=body) as response:
            if response.status_code != 200:
                raise LlamaCppBaselineError(f"llama-server /completion answered {response.status_code}: "
                                            f"{response.read().decode(errors='replace')[:500]}")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                at_s = time.perf_counter() - started
                event = json.loads(line[5:])
                if "error" in event:
                    raise LlamaCppBaselineError(f"llama-server: {event['error']}")
                server_timings = event.get("timings") or {}
                step = server_timings.get("predicted_ms")  # the same for every token of one decode step
                tokens = event.get("tokens") or []
                if tokens and (step is None or step != pending_step):
                    timing.add_chunk(pending_at, pending)
                    pending = []
                if tokens:
                    pending += tokens
                    pending_at, pending_step = at_s, step
                if event.get("tokens_predicted") is not None:
                    decoded = max(decoded, event["tokens_predicted"])
                if event.get("stop"):
                    self.last_server_timings[index] = server_timings
                    break
        timing.add_chunk(pending_at, pending)
        with self._lock:
            self.last_withheld_tokens += max(0, decoded - len(timing.token_ids))
        return timing

    def close(self) -> None:
        """Stop the server and wait for it (killed if it does not exit in time)."""
        atexit.unregister(self.close)
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(STOP_TIMEOUT_S)
        if not self._log.closed:
            self._log.close()
            try:
                os.unlink(self._log.name)
            except OSError:
                pass

    def __enter__(self) -> LlamaCppBaseline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # its own group (start_new_session): the server and anything it started
    except ProcessLookupError:
        pass
