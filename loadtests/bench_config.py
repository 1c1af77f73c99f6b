"""What a benchmark run is asked to do (`pipeinfer bench`'s settings) and
the prompt sets it can take: read by the CLI before anything loads, so
nothing here imports torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import EngineConfig
from pipeline.types import Mode

DEFAULT_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how a bill becomes a law in the United States.",
    "List the planets of the solar system and one fact about each of them.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The history of the printing press begins",
)
BASELINE_KINDS = "vllm, vllm-ngram, vllm-draft:PATH, llama.cpp, llama.cpp-ngram"
PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
PROMPT_SETS = ("extractive", "chat", "everyday")  # PROMPT_DIR/NAME.jsonl: written for this project
Prompt = str | tuple[tuple[str, str], ...]  # raw text, or a conversation of (role, content)


@dataclass(frozen=True, slots=True)
class BenchConfig:
    engine: EngineConfig
    modes: tuple[Mode, ...] = tuple(Mode)
    prompts: tuple[Prompt, ...] = DEFAULT_PROMPTS
    max_tokens: int = 64
    repeat: int = 2
    concurrency: tuple[int, ...] = (1,)
    out_dir: Path = Path("bench-out")
    baselines: tuple[str, ...] = ()  # BASELINE_KINDS
    llama_server: Path | None = None  # the llama.cpp baselines' binary (default: loadtests/llamacpp_baseline.py)
    calibrate: bool = False  # also write profile.json: this run as a simulation profile (loadtests/calibrate.py)
    long_prompt: int | None = None  # also time a short request alone and during a prompt of this many tokens

    def __post_init__(self) -> None:
        if not self.modes and not self.baselines:
            raise ValueError("nothing to measure: give --modes and/or --baselines")
        if not self.prompts:
            raise ValueError("no prompts")
        if self.max_tokens < 1 or self.repeat < 1 or not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("max_tokens, repeat and every concurrency must be >= 1")
        for kind in self.baselines:
            check_baseline_kind(kind)
        if self.baselines and self.engine.simulate:
            raise ValueError("--baselines run on this machine: they cannot be compared with --simulate")
        if self.long_prompt is not None and (self.long_prompt < 2 or self.engine.simulate):
            raise ValueError("--long-prompt takes a prompt length >= 2, timed on this machine (not with --simulate)")


def check_baseline_kind(kind: str) -> None:
    """A clear error for a kind that is none of BASELINE_KINDS (vLLM's draft
    model and llama.cpp's binary are looked for when the baseline starts)."""
    from loadtests.llamacpp_baseline import is_llamacpp_kind, server_flags
    from loadtests.vllm_baseline import is_vllm_kind

    if is_llamacpp_kind(kind):
        server_flags(kind)
    elif not is_vllm_kind(kind):
        raise ValueError(f"unknown baseline {kind!r}: expected one of {BASELINE_KINDS}")


def load_prompts(source: str | Path) -> tuple[Prompt, ...]:
    """A shipped set by name (PROMPT_SETS), or a file: one prompt per line,
    or JSONL objects with a "prompt" string or a "messages" conversation
    (sent through the model's chat template)."""
    path = PROMPT_DIR / f"{source}.jsonl" if str(source) in PROMPT_SETS else Path(source)
    if not path.exists():
        raise ValueError(f"{source}: no such prompt file (shipped sets: {', '.join(PROMPT_SETS)})")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    if path.suffix == ".jsonl" or lines[0].lstrip().startswith("{"):
        return tuple(_jsonl_prompt(path, number, line) for number, line in enumerate(lines, 1))
    return tuple(line.replace("\\n", "\n") for line in lines)


def _jsonl_prompt(path: Path, number: int, line: str) -> Prompt:
    where = f"{path}:{number}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"{where}: not JSON") from None
    if isinstance(entry, dict) and isinstance(entry.get("prompt"), str) and entry["prompt"]:
        return entry["prompt"]
    messages = entry.get("messages") if isinstance(entry, dict) else None
    if (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
        return tuple((m["role"], m["content"]) for m in messages)
    raise ValueError(f"{where}: expected a JSON object with a non-empty \"prompt\" string or a \"messages\" list "
                     "of {\"role\", \"content\"} objects")
