"""Draft models: cheap guesses of the target's next tokens."""

from draft_models.base import DraftModel, DraftProposal
from draft_models.factory import load_draft
from draft_models.spec import DRAFT_HELP, DraftSpec, DraftSpecError, parse_draft

__all__ = ["DRAFT_HELP", "DraftModel", "DraftProposal", "DraftSpec", "DraftSpecError", "load_draft", "parse_draft"]
