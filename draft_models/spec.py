"""--draft values: the one parser and the one list of draft kinds, read by
the factory, the CLI's help, the cluster YAML's description and the layout
planner."""

from __future__ import annotations

from dataclasses import dataclass

# Each kind as the user writes it, and what it is.
DRAFT_KINDS = {
    "auto": "ngram+head:default for a model that has a shipped head (the default model), else ngram",
    "none": "no draft (every mode decodes autoregressively)",
    "ngram": "prompt lookup (no weights)",
    "ngram+head:PATH": ("both the n-gram lookup and the head (as head:PATH): after each verification, the guesses of "
                        "whichever the request's record says is likelier to be accepted"),
    "layers:N": "the target's first N layers and its head",
    "int8": "a dynamically int8-quantized copy of the target",
    "synthetic:ALPHA": "an acceptance model for bench --simulate",
    "head:default": "the draft head shipped for the default model, run by the last stage (tail drafting)",
    "head:PATH": "a head trained with pipeinfer train-draft for this target",
    "vllm:PATH": "a draft run by vLLM (extra pipeinfer[vllm]), PATH as below",
    "PATH": "a smaller model sharing the target's tokenizer: a directory, a .gguf, 'default', or 'target' itself",
}
DRAFT_HELP = "; ".join(f"{kind}: {meaning}" for kind, meaning in DRAFT_KINDS.items())


class DraftSpecError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class DraftSpec:
    text: str  # as given, for messages
    kind: str  # auto | none | ngram | hybrid | layers | int8 | synthetic | head | vllm | model
    num_layers: int | None = None  # layers:N
    acceptance: float | None = None  # synthetic:ALPHA
    path: str | None = None  # vllm:PATH, head:PATH, ngram+head:PATH's head, or a model path

    @property
    def is_free(self) -> bool:
        """Its guesses cost the coordinator's side no compute (as the loaded
        draft's is_free says; a head computes on the last stage)."""
        return self.kind in ("auto", "none", "ngram", "hybrid", "head")

    @property
    def has_head(self) -> bool:
        """A head drafts on the last stage (head:PATH, ngram+head:PATH)."""
        return self.kind in ("head", "hybrid")

    def error(self, message: str) -> DraftSpecError:
        return DraftSpecError(f"--draft {self.text!r}: {message}")

    def check_layers(self, target_layers: int) -> None:
        """layers:N takes N of the target's layers: 1..all of them."""
        if self.kind == "layers" and not 1 <= self.num_layers <= target_layers:
            raise self.error(f"N must be in 1..{target_layers} (the target's layers)")


def parse_draft(text: str) -> DraftSpec:
    """The syntax only; what needs the target (N within its layers, a shared
    vocabulary, a model that exists) is checked where the draft is built."""
    text = text.strip()
    kind, _, arg = text.partition(":")
    if text in ("auto", "none", "ngram", "int8"):
        return DraftSpec(text, text)
    if kind == "ngram+head":
        if not arg.strip():
            raise DraftSpecError(f"--draft {text!r}: expected ngram+head:default or ngram+head:PATH")
        return DraftSpec(text, "hybrid", path=arg.strip())
    if kind == "layers":
        try:
            return DraftSpec(text, "layers", num_layers=int(arg))
        except ValueError:
            raise DraftSpecError(f"--draft {text!r}: expected layers:N with an integer N") from None
    if kind == "synthetic":
        try:
            acceptance = float(arg)
        except ValueError:
            acceptance = -1.0
        if not 0.0 <= acceptance <= 1.0:
            raise DraftSpecError(f"--draft {text!r}: expected synthetic:ALPHA with ALPHA in [0, 1]")
        return DraftSpec(text, "synthetic", acceptance=acceptance)
    if kind == "head":
        if not arg.strip():
            raise DraftSpecError(f"--draft {text!r}: expected head:default or head:PATH (a train-draft output)")
        return DraftSpec(text, "head", path=arg.strip())
    if kind == "vllm":
        if not arg.strip():
            raise DraftSpecError(f"--draft {text!r}: expected vllm:PATH (a model directory, a .gguf, 'default' "
                                 "or 'target')")
        return DraftSpec(text, "vllm", path=arg.strip())
    if not text:
        raise DraftSpecError(f"--draft is empty; drafts: {DRAFT_HELP}")
    return DraftSpec(text, "model", path=text)
