"""vLLM in a child process (optional extra pipeinfer[vllm]): the host that the
vLLM draft (draft_models/vllm_draft.py) and the vLLM benchmark baselines
(loadtests/vllm_baseline.py) run on.

vLLM never runs in our process. A VLLMHost is a child process
(`python -m compute.vllm_host FD`) holding one in-process vLLM engine
(VLLM_ENABLE_V1_MULTIPROCESSING=0: no separate engine-core and worker
processes, so on 2 cores vLLM gets both for its threads instead of reserving
one for a busy scheduler process, and starts in seconds). We talk to it over a
socket with pickled messages. This keeps vLLM's global side effects out of our
process: it replaces torch.set_num_threads, initialises torch.distributed and
sets up its own logging; two engines (a draft and a baseline) cannot share one
process; and `import vllm` happens only in the child, so this module imports
without vLLM.

The child runs two commands: `generate` (greedy, at a concurrency, timed per
output chunk: the baselines) and `propose` (a draft's guesses). A proposal's
tokens are chosen by our own rule, not vLLM's sampler: a vLLM logits
processor (_draft_sampler_class) calls compute.sampling.choose_token on each
drafted position's logits, records the choice, its confidence (the top
probability of the distribution it came from) and, for unseeded sampling,
that distribution q, and forces vLLM's greedy pick to the chosen token. So
greedy requests get argmax guesses, seeded requests the same Gumbel-noise
choice the target makes and unseeded requests real samples with their q, as
ModelDraft does. One proposal is one vLLM request over the whole context:
prefix caching makes the already-seen prefix free.
"""

from __future__ import annotations

import atexit
import importlib.util
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from compute.stage_model import DTYPES
from compute.types import SamplingParams

log = logging.getLogger(__name__)

INSTALL_HINT = ("vLLM is not installed: install the extra pipeinfer[vllm] "
                "(pip install -e '.[vllm]', as scripts/setup.sh does)")
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # what vLLM's dtype option takes
DEFAULT_KV_CACHE_BYTES = 1 << 30  # per host; SmolLM2-135M in float32 holds ~23k tokens in it
START_TIMEOUT_S = 900.0


class VLLMError(RuntimeError):
    pass


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_available():
        raise VLLMError(INSTALL_HINT)


class VLLMHost:
    """A child process holding one vLLM engine. Thread-safe: calls are serialized.

    options: model (a local directory), dtype, enforce_eager, max_num_seqs,
    max_model_len, kv_cache_bytes, enable_prefix_caching, speculative_config
    (vLLM's dict), draft_sampler (install our logits processor), threads
    (torch threads in the child; None: all cores).
    """

    def __init__(self, options: dict, verbose: bool = False, start_timeout_s: float = START_TIMEOUT_S) -> None:
        require_vllm()
        self.options = dict(options)
        self._lock = threading.Lock()
        self._closed = False
        self._log_file = None
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in the child itself
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")  # no usage report over the network
        env.setdefault("DO_NOT_TRACK", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")  # models are local paths, never downloaded
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.options.get("threads"):
            env["OMP_NUM_THREADS"] = str(self.options["threads"])
        if verbose:
            output = None
        else:
            self._log_file = tempfile.NamedTemporaryFile("w+", prefix="pipeinfer-vllm-", suffix=".log", delete=False)
            output = self._log_file
        root = str(Path(__file__).resolve().parent.parent)  # so the child finds this package even uninstalled
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "compute.vllm_host", str(child_sock.fileno())]
        self._proc = subprocess.Popen(command, pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL,
                                      stdout=output, stderr=subprocess.STDOUT if output else None)
        child_sock.close()
        self._conn = Connection(parent_sock.detach())
        try:
            self.info = self._request("start", self.options, timeout_s=start_timeout_s)
        except BaseException:
            self.close()
            raise
        _LIVE_HOSTS.add(self)

    def call(self, command: str, args: dict | None = None) -> object:
        if self._closed:
            raise VLLMError("the vLLM host is closed")
        return self._request(command, args or {})

    def _request(self, command: str, args: dict, timeout_s: float | None = None) -> object:
        with self._lock:
            try:
                self._conn.send((command, args))
                deadline = None if timeout_s is None else time.monotonic() + timeout_s
                while not self._conn.poll(0.5):
                    if self._proc.poll() is not None:
                        raise VLLMError(f"the vLLM process exited with status {self._proc.returncode}"
                                        f"{self._log_tail()}")
                    if deadline is not None and time.monotonic() > deadline:
                        raise VLLMError(f"the vLLM process did not answer {command!r} in {timeout_s:.0f} s"
                                        f"{self._log_tail()}")
                status, value = self._conn.recv()
            except (EOFError, OSError, pickle.PickleError) as exc:
                raise VLLMError(f"lost the vLLM process ({exc!r}){self._log_tail()}") from None
        if status == "error":
            raise VLLMError(f"vLLM failed on {command!r}: {value}{self._log_tail()}")
        return value

    def is_alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    def _log_tail(self, chars: int = 3000) -> str:
        if self._log_file is None:
            return ""
        try:
            text = Path(self._log_file.name).read_text(errors="replace")
        except OSError:
            return ""
        return f"\n--- vLLM log ({self._log_file.name}) ---\n{text[-chars:]}" if text.strip() else ""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _LIVE_HOSTS.discard(self)
        try:
            with self._lock:
                self._conn.send(("close", {}))
        except (OSError, ValueError):
            pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()
        if self._log_file is not None:
            self._log_file.close()
            os.unlink(self._log_file.name)

    def __enter__(self) -> VLLMHost:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_LIVE_HOSTS: set[VLLMHost] = set()


@atexit.register
def _close_live_hosts() -> None:
    for host in list(_LIVE_HOSTS):
        host.close()


# ---------------------------------------------------------------- the child side

# key -> {position: (token, confidence, q or None)}: what the logits processor chose.
_CHOICES: dict[str, dict[int, tuple[int, float, torch.Tensor | None]]] = {}


def _draft_sampler_class():
    """Our logits processor (built lazily: it subclasses vLLM's interface).

    For a request whose extra_args carry "pipeinfer", it chooses the token with
    compute.sampling.choose_token, records it in _CHOICES and masks the row so
    vLLM's greedy pick is that token. Other requests are left alone."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    from compute.sampling import choose_token

    class DraftSampler(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory) -> None:
            self.requests: dict[int, tuple] = {}  # batch index -> (spec, sampling, output ids, generator)

        def is_argmax_invariant(self) -> bool:
            return False  # it decides the greedy pick

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            process_dict_updates(self.requests, batch_update, self._new_state)

        @staticmethod
        def _new_state(params, prompt_ids, output_ids):
            spec = (params.extra_args or {}).get("pipeinfer")
            if spec is None:
                return None
            generator = None
            if spec["rng_seed"] is not None:
                generator = torch.Generator().manual_seed(spec["rng_seed"])
            return spec, SamplingParams(*spec["sampling"]), output_ids, generator

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            for index, (spec, sampling, output_ids, generator) in self.requests.items():
                if index >= logits.shape[0]:
                    continue
                position = spec["start"] + len(output_ids)
                token, probs = choose_token(logits[index], sampling, position, generator)
                q = probs if spec["want_q"] else None
                record = _CHOICES.get(spec["key"])
                if record is not None:
                    record[position] = (token, float(probs.max()), q)
                logits[index].fill_(float("-inf"))
                logits[index, token] = 0.0
            return logits

    return DraftSampler


class _Host:
    def __init__(self, options: dict) -> None:
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        if options.get("threads"):
            torch.set_num_threads(int(options["threads"]))
        model = Path(options["model"])
        has_tokenizer = any((model / name).exists() for name in ("tokenizer.json", "tokenizer.model"))
        args = EngineArgs(
            model=str(model),
            dtype=options.get("dtype", "float32"),
            enforce_eager=options.get("enforce_eager", True),
            max_num_seqs=options.get("max_num_seqs", 8),
            max_model_len=options.get("max_model_len"),
            kv_cache_memory_bytes=options.get("kv_cache_bytes", DEFAULT_KV_CACHE_BYTES),
            enable_prefix_caching=options.get("enable_prefix_caching", True),
            block_size=options.get("block_size"),
            speculative_config=options.get("speculative_config"),
            logits_processors=[_draft_sampler_class()] if options.get("draft_sampler") else None,
            skip_tokenizer_init=not has_tokenizer,
            disable_log_stats=not options.get("speculative_config"),  # spec-decode counters need stats
            seed=0,
        )
        self.engine = LLMEngine.from_engine_args(args)
        self._ids = itertools.count()
        # One short request now: an unsupported model (e.g. a head size vLLM's
        # CPU attention lacks) fails here, at start, not in the first request.
        self.generate([[0]], max_tokens=2, concurrency=1)

    def info(self) -> dict:
        import vllm

        return {"vllm_version": vllm.__version__, "threads": torch.get_num_threads(), "pid": os.getpid()}

    def generate(self, prompts: list[list[int]], max_tokens: int, concurrency: int, ignore_eos: bool = True) -> dict:
        """Greedy, at most `concurrency` requests in flight; per request the
        output chunks as a streaming client gets them (one per engine step,
        several tokens under speculation), timed from its submission."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = VSamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos, detokenize=False,
                                 output_kind=RequestOutputKind.DELTA)
        pending = list(enumerate(prompts))[::-1]
        in_flight: dict[str, tuple[int, float]] = {}
        results = [{"times": [], "chunks": [], "finish_reason": None} for _ in prompts]
        before = self._spec_counters()
        while pending or in_flight:
            while pending and len(in_flight) < concurrency:
                index, prompt = pending.pop()
                request_id = f"g{next(self._ids)}"
                in_flight[request_id] = (index, time.perf_counter())
                self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt)), params)
            outputs = self.engine.step()
            now = time.perf_counter()
            for output in outputs:
                index, submitted = in_flight[output.request_id]
                completion = output.outputs[0]
                if completion.token_ids:
                    results[index]["times"].append(now - submitted)
                    results[index]["chunks"].append(list(completion.token_ids))
                if output.finished:
                    results[index]["finish_reason"] = completion.finish_reason
                    del in_flight[output.request_id]
        after = self._spec_counters()
        spec = None
        if after is not None and before is not None:
            spec = {name: after[name] - before.get(name, 0) for name in after}
        return {"requests": results, "spec_decode": spec}

    def _spec_counters(self) -> dict | None:
        if self.engine.vllm_config.speculative_config is None:
            return None
        try:
            metrics = self.engine.get_metrics()
        except Exception:  # stats are a bonus: never fail a run for them
            return None
        counters: dict[str, float] = {}
        for metric in metrics:
            if metric.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                               "vllm:spec_decode_num_accepted_tokens"):
                name = metric.name.removeprefix("vllm:spec_decode_")
                counters[name] = counters.get(name, 0) + getattr(metric, "value", 0)
        return counters

    def propose(self, context: list[int], max_tokens: int, rng_seed: int | None,
                sampling: tuple) -> tuple[list[int], list[float], object]:
        """-> the drafted tokens, their confidences, and for unseeded sampling
        their q as a numpy array [n, vocab] (None otherwise; arrays, not
        tensors, cross the socket)."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ours = SamplingParams(*sampling)
        request_id = f"p{next(self._ids)}"
        want_q = not (ours.is_greedy or ours.is_coupled)
        spec = {"key": request_id, "start": len(context), "sampling": tuple(sampling), "rng_seed": rng_seed,
                "want_q": want_q}
        # vLLM itself decodes greedily: our logits processor has masked each row to the token it chose.
        params = VSamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                                 output_kind=RequestOutputKind.DELTA, extra_args={"pipeinfer": spec})
        choices = _CHOICES.setdefault(request_id, {})
        tokens: list[int] = []
        confidences: list[float] = []
        qs: list[torch.Tensor] = []
        self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(context)), params)
        try:
            finished = False
            while not finished and len(tokens) < max_tokens:
                new_tokens: list[int] = []
                for output in self.engine.step():
                    if output.request_id == request_id:
                        new_tokens += output.outputs[0].token_ids
                        finished = finished or output.finished
                for token in new_tokens:
                    chosen, confidence, q = choices[len(context) + len(tokens)]
                    if chosen != token:
                        raise RuntimeError(f"vLLM produced token {token} where the draft chose {chosen}")
                    tokens.append(token)
                    confidences.append(confidence)
                    if want_q:
                        qs.append(q)
                if not self.engine.has_unfinished_requests():
                    break
        finally:
            _CHOICES.pop(request_id, None)
            if self.engine.has_unfinished_requests():
                self.engine.abort_request([request_id])
                while self.engine.has_unfinished_requests():
                    self.engine.step()
        tokens, confidences = tokens[:max_tokens], confidences[:max_tokens]
        if not want_q or not tokens:
            return tokens, confidences, None
        return tokens, confidences, torch.stack(qs[: len(tokens)]).numpy()


def _host_main(fd: int) -> None:
    _die_with_parent()
    conn = Connection(fd)
    host = None
    while True:
        try:
            command, args = conn.recv()
        except (EOFError, OSError):
            break
        if command == "close":
            break
        try:
            if command == "start":
                host = _Host(args)
                result = host.info()
            elif host is None:
                raise RuntimeError("the engine is not started")
            elif command == "generate":
                result = host.generate(**args)
            elif command == "propose":
                result = host.propose(**args)
            else:
                raise ValueError(f"unknown command {command!r}")
            reply = ("ok", result)
        except Exception:
            reply = ("error", traceback.format_exc(limit=8))
        try:
            conn.send(reply)
        except (OSError, BrokenPipeError):
            break
    conn.close()
    os._exit(0)  # skip vLLM's atexit teardown: nothing in this process outlives the engine


def _die_with_parent() -> None:
    """Exit when the parent process is gone (an idle host notices the closed
    socket anyway; this also covers one busy in a long request)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m compute.vllm_host FD (started by VLLMHost)")
    _host_main(int(sys.argv[1]))
