"""Test helpers: tiny random models, the greedy reference, engines.

Tiny random Llama-family models are made from a config with a fixed seed.

Fast to build and run, and exactness checks work on them. A larger
initializer_range than usual makes logits peaked, so greedy decoding has no
near-ties that float rounding could flip between batched and step-wise compute.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
from scipy.stats import chisquare
from transformers import AutoConfig, AutoModelForCausalLM

from compute.line_kv import DraftKV
from compute.model_source import load_config
from compute.stage_model import StageModel
from draft_models import DraftModel
from pipeline.config import EngineConfig
from pipeline.coordinator import STALL_TIMEOUT_S
from pipeline.drafter import Drafter, local_drafter
from pipeline.engine import Engine
from pipeline.local_transport import LocalTransport
from pipeline.partition import balanced_plans
from pipeline.speculation import SpeculationConfig
from pipeline.stage import Stage
from pipeline.types import Mode

TINY_VOCAB = 96
P_VALUE_FLOOR = 1e-3  # fixed seeds: deterministic; a broken rule fails by many orders of magnitude
P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.07, 0.03])  # a target distribution
Q = torch.tensor([0.05, 0.10, 0.50, 0.05, 0.20, 0.10])  # a draft that disagrees a lot


def assert_follows(counts: np.ndarray, p: torch.Tensor) -> None:
    """A chi-square test that counts were drawn from p."""
    p = p.double().numpy()
    expected = p / p.sum() * counts.sum()
    assert chisquare(counts, expected).pvalue > P_VALUE_FLOOR, (counts, expected)


def make_tiny_model(
    out_dir: Path,
    seed: int,
    model_type: str = "llama",
    num_layers: int = 4,
    vocab_size: int = TINY_VOCAB,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    init_range: float = 0.3,
    max_position_embeddings: int = 512,
    **extra,
) -> Path:
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_range,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def greedy_reference(model_dir: Path, prompt_ids: list[int], max_new_tokens: int, *,
                     eos_token_id: int | None = None, quantize: str = "auto") -> list[int]:
    """Greedy decoding of the target alone, as the stages compute it (a
    quantized one included): one stage, the prompt in one forward, then one
    token a forward, up to eos_token_id (included). Batch invariance makes
    every mode, split, batch and timing equal it bit for bit; that the
    stages' arithmetic is the model's is tests/compute/test_stage_model.py's
    (logits against transformers') and a real model's answers against
    transformers' generate (tests/pipeline/test_lossless.py)."""
    key = (Path(model_dir), quantize)
    if key not in _TARGETS:
        _TARGETS[key] = StageModel.load(model_dir, 0, load_config(model_dir).num_hidden_layers, with_embed=True,
                                        with_head=True, quantize=quantize).pack_weights()
    model = _TARGETS[key]
    kv = DraftKV(model.num_layers)
    hidden, tokens = model.embed(prompt_ids), []
    while len(tokens) < max_new_tokens and (not tokens or tokens[-1] != eos_token_id):
        hidden = model.forward_layers(hidden, kv)
        kv.advance(hidden.shape[1])
        tokens.append(int(model.logits(hidden[:, -1:])[0].argmax()))
        hidden = model.embed(tokens[-1:])
    return tokens


_TARGETS: dict[tuple[Path, str], StageModel] = {}


def transformers_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own generate() of the model (float32), greedy."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    model.generation_config.eos_token_id = None
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, min_new_tokens=0)
    return out[0, len(prompt_ids):].tolist()


def load_engine(model: Path | str, draft: str | DraftModel | Drafter = "none", stages: int = 1,
                mode: Mode | str = Mode.PIPEINFER, layer_delay=None, stall_timeout_s: float = STALL_TIMEOUT_S,
                quantize: str = "auto", **speculation) -> Engine:
    """An engine on local stages; a draft (or drafter) given as an object is assembled in by hand."""
    spec = SpeculationConfig(mode=Mode(mode), **speculation)
    if not isinstance(draft, (str, Path)):
        plans = [dataclasses.replace(plan, quantize=quantize) for plan in balanced_plans(model, stages)]
        transport = LocalTransport([Stage.load(model, plans, i, "float32") for i in range(stages)], layer_delay)
        drafter = local_drafter(draft) if hasattr(draft, "propose") else draft
        return Engine(Path(model), transport, drafter, spec, stall_timeout_s=stall_timeout_s)
    config = EngineConfig(model=str(model), draft=str(draft), num_stages=stages, quantize=quantize, speculation=spec)
    return Engine.load(config, layer_delay=layer_delay, show_progress=False, stall_timeout_s=stall_timeout_s)


def make_tiny_head(target_dir: Path, out_dir: Path, seed: int) -> Path:
    """A random draft head for a tiny target (draft_models/head.py), saved as train-draft saves one."""
    from draft_models.head import DraftHead, HeadConfig, target_embedding

    vocab = AutoConfig.from_pretrained(target_dir).vocab_size
    config = HeadConfig.for_target(target_dir, tuple(range(vocab - 1, vocab // 2 - 1, -1)))
    torch.manual_seed(seed)
    DraftHead(config, target_embedding(target_dir)).save(out_dir)
    return Path(out_dir)


def make_tiny_model_with_tokenizer(out_dir: Path, seed: int, tokenizer_from: Path, **kwargs) -> Path:
    """A tiny random model that speaks the default model's tokenizer (for text APIs)."""
    vocab_size = AutoConfig.from_pretrained(tokenizer_from).vocab_size
    make_tiny_model(out_dir, seed, vocab_size=vocab_size, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (Path(tokenizer_from) / name).exists():
            shutil.copy(Path(tokenizer_from) / name, out_dir / name)
    return Path(out_dir)


class ServerProcess:
    """`pipeinfer serve` in its own process on a free loopback port."""

    def __init__(self, *args: str, api_key: str | None = None, env: dict[str, str] | None = None,
                 ready_timeout: float = 180) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # Its output, in a file while it runs; close() keeps the text and removes the file.
        descriptor, name = tempfile.mkstemp(prefix=f"pipeinfer-test-server-{self.port}-", suffix=".log")
        os.close(descriptor)
        self.log_path, self._closed_log = Path(name), ""
        command = [str(Path(sys.executable).parent / "pipeinfer"), "serve", "--port", str(self.port), *args]
        if api_key:
            command += ["--api-key", api_key]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"server exited: {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise TimeoutError(f"server not healthy in {ready_timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else self._closed_log

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:
                self.proc.kill()
        self._log.close()
        if self.log_path.exists():
            self._closed_log = self.log_path.read_text()
            self.log_path.unlink()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def process_tree(pid: int) -> list[psutil.Process]:
    """pid's descendants as they are now (record it early: orphans are re-parented)."""
    return psutil.Process(pid).children(recursive=True)


def assert_gone(processes: list[psutil.Process], within_s: float) -> None:
    """Every process has exited (is_running() also notices a reused pid)."""
    deadline = time.monotonic() + within_s
    alive = list(processes)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _is_running(p)]
        time.sleep(0.1)
    assert not alive, [(p.pid, _describe(p)) for p in alive]


def _is_running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())[:120] or process.name()
    except psutil.Error:
        return "?"


def listening_addresses(processes: list[psutil.Process]) -> list[str]:
    """The local IP of every TCP socket these processes listen on."""
    addresses = []
    for process in processes:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        addresses += [c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN]
    return addresses
