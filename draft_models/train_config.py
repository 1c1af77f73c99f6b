"""`pipeinfer train-draft`'s settings (draft_models/distill.py trains with
them): read by the CLI before anything loads, so nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from draft_models.spec import parse_draft


@dataclass(frozen=True)
class TrainConfig:
    model: str = "default"
    out_dir: Path = Path("head")
    num_prompts: int = 8192  # the first of the prompt set (training_prompts); a tenth of each block held out
    target_prompts: int = 0  # requests the target writes itself (writing_asks), answered after those; a tenth held out
    # Requests the target may not write (the command line passes the bench's, so that the
    # bench measures prompts the head never saw): one it writes is replaced by its ask's example.
    reserved: tuple[str, ...] = ()
    max_new_tokens: int = 128
    sampled_share: float = 0.25  # batches of continuations sampled (SAMPLED_TEMPERATURE) instead of greedy
    gen_batch: int = 64  # answers generated together, in one forward per step
    steps: int = 1200
    batch: int = 8  # conversations per step (every position of each)
    depth: int = 4  # draft steps unrolled in training (and measured)
    draft_vocab: int = 8192
    soft_weight: float = 0.5  # of the loss on the target's top tokens (soft labels), beside its greedy token
    lr: float = 1e-3
    init: str = ""  # a head to start from (head:default or head:DIR): its weights and draft vocabulary
    eval_every: int = 100
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        if min(self.num_prompts, self.target_prompts) < 0 or self.num_prompts + self.target_prompts < 2:
            raise ValueError("--num-prompts and --target-prompts >= 0, and two prompts at least in all")
        if self.max_new_tokens < 4 or self.steps < 1 or self.batch < 1:
            raise ValueError("--max-new-tokens >= 4, --steps >= 1 and --batch >= 1")
        if not 1 <= self.depth <= 16 or self.draft_vocab < 2 or not 0 <= self.sampled_share <= 1:
            raise ValueError("--depth in 1..16, --draft-vocab >= 2, sampled share in [0, 1]")
        if not 0 <= self.soft_weight <= 1:
            raise ValueError("--soft-weight in [0, 1]")
        if self.init and parse_draft(self.init).kind != "head":
            raise ValueError(f"--init {self.init!r}: expected head:default or head:DIR (a train-draft output)")
