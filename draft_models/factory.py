"""Parse a --draft value and build the draft it names."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from compute.model_source import ModelSourceError, load_config, resolve_model
from compute.stage_model import StageModel
from compute.threads import on_passing_thread
from draft_models.base import DraftModel, NoDraft
from draft_models.head import HeadError, TailDraft, checked_head_dir
from draft_models.model_draft import ModelDraft
from draft_models.ngram import NGramDraft
from draft_models.spec import DRAFT_KINDS, DraftSpec, DraftSpecError, parse_draft
from draft_models.synthetic import SyntheticDraft


def concrete_draft(text: str, target_dir: Path) -> str:
    """`auto` as the draft it means for this target: ngram+head:default where
    the shipped head was trained for it, ngram otherwise; any other value as
    given. (What `auto` became is what logs, /health and results say.)"""
    if parse_draft(text).kind != "auto":
        return text
    try:
        checked_head_dir("default", target_dir)
        return "ngram+head:default"
    except HeadError:
        return "ngram"


def load_draft(text: str, target_dir: Path, dtype: torch.dtype = torch.float32, show_progress: bool = True) -> DraftModel:
    """The coordinator's side of the draft `text` (a concrete one: see concrete_draft)."""
    spec = parse_draft(concrete_draft(text, target_dir))
    target_config = load_config(target_dir)
    num_layers = target_config.num_hidden_layers
    if spec.kind == "none":
        return NoDraft()
    if spec.kind == "ngram":
        return NGramDraft()
    if spec.kind == "layers":
        spec.check_layers(num_layers)
        return ModelDraft(spec.text, _packed_model(target_dir, spec.num_layers, dtype))
    if spec.kind == "synthetic":
        oracle = ModelDraft("target", _packed_model(target_dir, num_layers, dtype))
        return SyntheticDraft(oracle, spec.acceptance, target_config.vocab_size)
    if spec.kind == "int8":
        return ModelDraft(spec.text, on_passing_thread(lambda: _int8_model(target_dir, num_layers)))
    if spec.kind == "head":
        head_path(spec, target_dir)
        return TailDraft(spec.text)
    if spec.kind == "hybrid":  # the head on the last stage; here, the lookup (the coordinator picks: _take_tail_offer)
        head_path(spec, target_dir)
        return NGramDraft(name=spec.text)
    if spec.kind == "vllm":
        return _vllm_draft(spec, target_dir, dtype, show_progress)
    draft_dir = draft_model_dir(spec, target_dir, show_progress)
    return ModelDraft(spec.text, _packed_model(draft_dir, load_config(draft_dir).num_hidden_layers, dtype))


def head_path(spec: DraftSpec, target_dir: Path) -> Path:
    """head:PATH's directory, checked against the target (a clear --draft error)."""
    try:
        return checked_head_dir(spec.path, target_dir)
    except HeadError as exc:
        raise spec.error(str(exc)) from None


def _packed_model(model_dir: Path, num_layers: int, dtype: torch.dtype) -> StageModel:
    """The first num_layers layers and the head, packed (on a passing thread: compute/threads.py)."""
    return on_passing_thread(lambda: StageModel.load(model_dir, 0, num_layers, with_embed=True, with_head=True,
                                                     dtype=dtype).pack_weights())


def _int8_model(target_dir: Path, num_layers: int):
    full = StageModel.load(target_dir, 0, num_layers, with_embed=True, with_head=True, dtype=torch.float32)
    with warnings.catch_warnings():  # torch.ao is deprecated in favour of torchao, but still works here
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(full, {torch.nn.Linear}, dtype=torch.qint8)


def draft_model_dir(spec: DraftSpec, target_dir: Path, show_progress: bool = False) -> Path:
    """The weights a model draft (PATH, or vllm:PATH) runs: checked to exist
    and to share the target's tokenizer."""
    if spec.path == "target":
        return target_dir
    try:
        draft_dir = resolve_model(spec.path, show_progress)
    except ModelSourceError as exc:
        raise spec.error(f"{exc}. Drafts: {', '.join(DRAFT_KINDS)}") from None
    check_same_vocabulary(target_dir, draft_dir)
    return draft_dir


def _vllm_draft(spec: DraftSpec, target_dir: Path, dtype: torch.dtype, show_progress: bool) -> DraftModel:
    """vllm:PATH: the draft runs in vLLM (imported lazily, in a child process)."""
    from compute.vllm_host import VLLMError, require_vllm
    from draft_models.vllm_draft import VLLMDraft

    try:
        require_vllm()
    except VLLMError as exc:
        raise spec.error(str(exc)) from None
    draft_dir = draft_model_dir(spec, target_dir, show_progress)
    try:
        return VLLMDraft.shared(spec.text, draft_dir, dtype)
    except VLLMError as exc:
        raise spec.error(f"vLLM could not load {draft_dir}: {exc}") from None


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
