"""Draft models: cheap guesses of the target's next tokens."""

from draft_models.base import DraftModel, DraftProposal
from draft_models.factory import DraftSpecError, load_draft

__all__ = ["DraftModel", "DraftProposal", "DraftSpecError", "load_draft"]
