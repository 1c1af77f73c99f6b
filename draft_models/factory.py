"""Parse a --draft value and build the draft it names."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from draft_models.base import DraftModel, NoDraft
from draft_models.model_draft import ModelDraft
from draft_models.ngram import NGramDraft
from draft_models.synthetic import SyntheticDraft
from pipeline.model_source import ModelSourceError, load_config, resolve_model
from pipeline.stage_model import StageModel

DRAFT_KINDS = ("none, ngram, layers:N, int8, synthetic:ALPHA (an acceptance model for --simulate), "
               "vllm:PATH (a draft run by vLLM, extra pipeinfer[vllm]; PATH as below, 'default', or 'target' for "
               "the target itself), or a path to a smaller model sharing the target's tokenizer")


class DraftSpecError(ValueError):
    pass


def load_draft(spec: str, target_dir: Path, dtype: torch.dtype = torch.float32, show_progress: bool = True) -> DraftModel:
    spec = spec.strip()
    target_config = load_config(target_dir)
    num_layers = target_config.num_hidden_layers
    if spec == "none":
        return NoDraft()
    if spec == "ngram":
        return NGramDraft()
    if spec.startswith("layers:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            raise DraftSpecError(f"--draft {spec!r}: expected layers:N with an integer N") from None
        if not 1 <= count <= num_layers:
            raise DraftSpecError(f"--draft {spec!r}: N must be in 1..{num_layers} (the target's layers)")
        return ModelDraft(spec, StageModel.load(target_dir, 0, count, with_embed=True, with_head=True, dtype=dtype))
    if spec.startswith("synthetic:"):
        try:
            acceptance = float(spec.split(":", 1)[1])
        except ValueError:
            raise DraftSpecError(f"--draft {spec!r}: expected synthetic:ALPHA with ALPHA in [0, 1]") from None
        if not 0.0 <= acceptance <= 1.0:
            raise DraftSpecError(f"--draft {spec!r}: ALPHA must be in [0, 1]")
        oracle = ModelDraft("target", StageModel.load(target_dir, 0, num_layers, with_embed=True, with_head=True,
                                                      dtype=dtype))
        return SyntheticDraft(oracle, acceptance, target_config.vocab_size)
    if spec == "int8":
        full = StageModel.load(target_dir, 0, num_layers, with_embed=True, with_head=True, dtype=torch.float32)
        with warnings.catch_warnings():  # torch.ao is deprecated in favour of torchao, but still works here
            warnings.simplefilter("ignore")
            quantized = torch.ao.quantization.quantize_dynamic(full, {torch.nn.Linear}, dtype=torch.qint8)
        return ModelDraft(spec, quantized)
    if spec.startswith("vllm:"):
        return _vllm_draft(spec, target_dir, dtype, show_progress)
    try:
        draft_dir = resolve_model(spec, show_progress)
    except ModelSourceError as exc:
        raise DraftSpecError(f"--draft {spec!r}: {exc}. Drafts: {DRAFT_KINDS}") from None
    check_same_vocabulary(target_dir, draft_dir)
    draft_config = load_config(draft_dir)
    model = StageModel.load(draft_dir, 0, draft_config.num_hidden_layers, with_embed=True, with_head=True, dtype=dtype)
    return ModelDraft(str(spec), model)


def _vllm_draft(spec: str, target_dir: Path, dtype: torch.dtype, show_progress: bool) -> DraftModel:
    """vllm:PATH: the draft runs in vLLM (imported lazily, in a child process)."""
    from draft_models.vllm_draft import VLLMDraft, VLLMError, require_vllm

    path = spec.split(":", 1)[1].strip()
    if not path:
        raise DraftSpecError(f"--draft {spec!r}: expected vllm:PATH (a model directory, a .gguf, 'default' "
                             "or 'target')")
    try:
        require_vllm()
    except VLLMError as exc:
        raise DraftSpecError(f"--draft {spec!r}: {exc}") from None
    if path == "target":
        draft_dir = target_dir
    else:
        try:
            draft_dir = resolve_model(path, show_progress)
        except ModelSourceError as exc:
            raise DraftSpecError(f"--draft {spec!r}: {exc}. Drafts: {DRAFT_KINDS}") from None
        check_same_vocabulary(target_dir, draft_dir)
    try:
        return VLLMDraft.shared(spec, draft_dir, dtype)
    except VLLMError as exc:
        raise DraftSpecError(f"--draft {spec!r}: vLLM could not load {draft_dir}: {exc}") from None


def check_same_vocabulary(target_dir: Path, draft_dir: Path) -> None:
    target_vocab = load_config(target_dir).vocab_size
    draft_vocab = load_config(draft_dir).vocab_size
    if target_vocab != draft_vocab:
        raise DraftSpecError(
            f"draft {draft_dir} has a vocabulary of {draft_vocab} tokens, the target {target_vocab}: "
            "a draft must share the target's tokenizer"
        )
    target_tok, draft_tok = _tokenizer_vocab(target_dir), _tokenizer_vocab(draft_dir)
    if target_tok is not None and draft_tok is not None and target_tok != draft_tok:
        raise DraftSpecError(f"draft {draft_dir} uses a different tokenizer than the target {target_dir}")


def _tokenizer_vocab(model_dir: Path) -> dict | None:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["model"].get("vocab")
