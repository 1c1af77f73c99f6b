"""Draft models: cheap guesses of the target's next tokens."""

from draft_models.spec import DRAFT_HELP, DraftSpec, DraftSpecError, parse_draft

__all__ = ["DRAFT_HELP", "DraftModel", "DraftProposal", "DraftSpec", "DraftSpecError", "load_draft", "parse_draft"]


def __getattr__(name: str):
    """The drafts themselves (and torch under them) load on first use: the
    CLI's --help and a YAML's validation read only the --draft syntax."""
    if name == "load_draft":
        from draft_models.factory import load_draft

        return load_draft
    if name in ("DraftModel", "DraftProposal"):
        from draft_models import base

        return getattr(base, name)
    raise AttributeError(f"module 'draft_models' has no attribute {name!r}")
