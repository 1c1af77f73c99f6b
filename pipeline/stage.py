"""One pipeline stage: its layers, the KV of every sequence, its cancellations.

Transport-agnostic: the local, Ray and MPI transports all drive a Stage the
same way (process runs and KV ops in arrival order; cancel from anywhere).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from compute.backend import StageBackend, torch_device
from compute.sampling import sampling_probs, target_tokens
from compute.stage_model import DTYPES, StageModel
from compute.threads import on_passing_thread
from compute.types import Failure, FailureCode
from draft_models.head import DraftHead, HeadLine, read_head_config
from pipeline.kv_cache import KVCacheError, StageKVCache
from pipeline.partition import StagePlan
from pipeline.trace import SpanRecorder, StageSpan
from pipeline.types import FreeSequence, KVOp, Run, RunResult, SequenceFailed


@dataclass(slots=True)
class StageCounters:
    num_runs_computed: int = 0
    num_runs_skipped: int = 0  # cancelled before they started here
    num_runs_stopped_mid_forward: int = 0  # cancelled between two layers
    num_forwards: int = 0  # forwards computed; fewer than runs where runs shared one (batching)
    draft_head_s: float = 0.0  # tail drafting: the head's compute
    draft_head_tokens: int = 0  # and the guesses it made


class Stage:
    def __init__(self, model: StageBackend, stage_index: int, kv_budget_bytes: int | None = None,
                 head: DraftHead | None = None, capture: tuple[int, ...] = ()) -> None:
        """head: a draft head the last stage runs after the logits (tail
        drafting); capture: the local layers whose outputs a head downstream
        reads (they travel on with the hidden states)."""
        self.model = model
        self.head = head
        self.head_lines: dict[int, HeadLine] = {}  # seq_id -> the head's state (last stage, with a head)
        self.capture = capture
        self.stage_index = stage_index
        self.kv = StageKVCache(model.num_layers, kv_budget_bytes, beside=self._head_bytes)
        self.counters = StageCounters()
        self.spans = SpanRecorder()
        self._lock = threading.Lock()
        self._cancelled: dict[int, set[int]] = {}  # seq_id -> cancelled run ids
        self._kv_snapshot = (0, 0)  # (bytes, sequences), refreshed by the compute thread (KV and head lines)
        self._active_at = time.monotonic()  # last progress: a layer, a run, a KV op

    @classmethod
    def load(cls, model_dir: str | Path, plans: Sequence[StagePlan], index: int, dtype: str,
             kv_budget_bytes: int | None = None, device: str = "cpu") -> Stage:
        """Stage `index` of the pipeline that `plans` split, with only its
        layers' weights (the first stage also embeds; the last also runs the
        final norm and the head), on the torch backend. dtype: a DTYPES name,
        device: cpu | cuda[:N], unless its plan names its own."""
        plan = plans[index]
        where = torch_device(plan.device or device)
        is_last = index == len(plans) - 1
        model = on_passing_thread(lambda: StageModel.load(
            model_dir, plan.layer_start, plan.layer_end, with_embed=index == 0, with_head=is_last,
            dtype=DTYPES[plan.dtype or dtype], device=where, quantize=plan.quantize or "auto").pack_weights())
        if plan.draft_head is None:
            return cls(model, index, kv_budget_bytes)
        head_dir = Path(plan.draft_head)
        layers = read_head_config(head_dir).feature_layers
        capture = tuple(layer - plan.layer_start for layer in layers if plan.layer_start <= layer < plan.layer_end)
        head = on_passing_thread(lambda: DraftHead.load(head_dir, Path(model_dir))) if is_last else None
        return cls(model, index, kv_budget_bytes, head, capture)

    def stats(self) -> dict:
        """Safe to call from any thread."""
        kv_bytes, num_sequences = self._kv_snapshot
        return {
            "stage": self.stage_index,
            "layers": [self.model.layer_start, self.model.layer_end],
            "device": str(self.model.device),
            "parameter_bytes": self.model.parameter_bytes(),
            "decode_read_bytes": self.model.decode_read_bytes(),
            "weight_format": self.model.weight_format(),
            "decode_timing": self.model.decode_timing(),
            "kv_bytes": kv_bytes,
            "num_sequences": num_sequences,
            "num_runs_computed": self.counters.num_runs_computed,
            "num_runs_skipped": self.counters.num_runs_skipped,
            "num_runs_stopped_mid_forward": self.counters.num_runs_stopped_mid_forward,
            "num_forwards": self.counters.num_forwards,
            "draft_head_s": round(self.counters.draft_head_s, 6),
            "draft_head_tokens": self.counters.draft_head_tokens,
        }

    def _head_bytes(self) -> int:
        return sum(line.num_bytes() for line in self.head_lines.values())

    def _refresh_snapshot(self) -> None:
        self._kv_snapshot = (self.kv.num_bytes() + self._head_bytes(), len(self.kv.sequences))

    @property
    def is_first(self) -> bool:
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    def idle_s(self) -> float:
        """Seconds since this stage last made progress (safe from any thread)."""
        return time.monotonic() - self._active_at

    def cancel(self, seq_id: int, run_ids: list[int]) -> None:
        """Thread-safe; takes effect before the run starts or between two layers."""
        with self._lock:
            self._cancelled.setdefault(seq_id, set()).update(run_ids)
        self.kv.cancel(run_ids)

    def is_cancelled(self, run: Run) -> bool:
        with self._lock:
            return run.run_id in self._cancelled.get(run.seq_id, ())

    def _between_layers(self, run: Run) -> bool:
        """-> whether to stop the run here (it was cancelled)."""
        self._active_at = time.monotonic()
        return self.is_cancelled(run)

    def apply(self, op: KVOp) -> None:
        self._active_at = time.monotonic()
        self.kv.apply(op)
        if isinstance(op, FreeSequence):
            self.head_lines.pop(op.seq_id, None)
            with self._lock:
                self._cancelled.pop(op.seq_id, None)
        self._refresh_snapshot()

    def reset(self) -> None:
        """Forget every sequence (the KV, the head's lines, the cancellations):
        another stage lost its state, so these are stale."""
        self.kv = StageKVCache(self.model.num_layers, self.kv.budget_bytes, beside=self._head_bytes)
        self.head_lines.clear()
        with self._lock:
            self._cancelled.clear()
        self._refresh_snapshot()

    def process(
        self,
        run: Run,
        hidden: torch.Tensor | None,
        before_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor | RunResult | None:
        """-> hidden states for the next stage, the run's result (last stage,
        or an error), or None when the run was cancelled."""
        return self.process_batch([(run, hidden)], before_layer)[0]

    def process_batch(
        self,
        items: Sequence[tuple[Run, torch.Tensor | None]],
        before_layer: Callable[[int], None] | None = None,
    ) -> list[torch.Tensor | RunResult | None]:
        """Runs waiting for this stage, of any sequences, in one forward (see
        StageModel.forward_batch); a run of a sequence comes after the runs
        before it in its chain. -> per run, as process()."""
        started = time.time()
        self._active_at = time.monotonic()
        outs: list[torch.Tensor | RunResult | None] = [None] * len(items)
        outcomes = ["skipped"] * len(items)
        try:
            live = []  # (index, run, hidden, its KV)
            for i, (run, hidden) in enumerate(items):
                if self.is_cancelled(run):
                    self.counters.num_runs_skipped += 1
                    continue
                try:
                    run_kv = self.kv.begin_run(run)
                except KVCacheError as exc:
                    outs[i], outcomes[i] = stage_failure(run, self.stage_index, exc), "computed"
                    continue
                if self.is_first:
                    hidden = self.model.embed(run.token_ids)
                live.append((i, run, hidden, run_kv))
            if live:
                self._compute(live, outs, outcomes, before_layer)
            return outs
        finally:
            self._active_at = time.monotonic()
            self._refresh_snapshot()
            ended = time.time()
            for (run, _), out, outcome in zip(items, outs, outcomes):
                self._record_span(run, started, ended, out, outcome)

    def _compute(self, live, outs, outcomes, before_layer) -> None:
        self.counters.num_forwards += 1
        hiddens = self.model.forward_batch(
            [hidden for _, _, hidden, _ in live], [run_kv for *_, run_kv in live],
            lambda: [self._between_layers(run) for _, run, _, _ in live], before_layer, self.capture)
        done = []
        for (i, run, _, _), hidden in zip(live, hiddens):
            if hidden is None:
                outcomes[i] = "stopped"
                self.counters.num_runs_stopped_mid_forward += 1
                self.kv.drop_run(run.run_id)
                continue
            outcomes[i] = "computed"
            self.counters.num_runs_computed += 1
            outs[i] = hidden
            done.append((i, run, hidden))
        if not self.is_last or not done:
            return
        width = self.head.config.hidden_size if self.head is not None else None
        needed = [hidden[:, run.logits_from:, :width] for _, run, hidden in done]
        logits = self.model.logits(torch.cat(needed, dim=1))  # one read of the head, for the outputs needed
        offset = 0
        for (i, run, hidden), rows in zip(done, needed):
            try:  # a request whose own parameters cannot be computed fails alone, not the runs beside it
                outs[i] = self._result(run, logits[offset:offset + rows.shape[1]])
                if self.head is not None:
                    self._draft(run, outs[i], hidden[0, :, width:])
            except Exception as exc:
                outs[i] = stage_failure(run, self.stage_index, exc)
            offset += rows.shape[1]

    def _record_span(self, run: Run, started: float, ended: float, out, outcome: str) -> None:
        if isinstance(out, torch.Tensor):
            out_bytes = out.numel() * out.element_size()
        elif isinstance(out, RunResult):
            out_bytes = result_bytes(out)
        else:
            out_bytes = 0
        self.spans.record(StageSpan(self.stage_index, run.seq_id, run.run_id, run.is_speculative,
                                    len(run.token_ids), started, ended, outcome, out_bytes))

    def _draft(self, run: Run, result: RunResult, features: torch.Tensor) -> None:
        """Tail drafting. Every run: the head's line takes in the run's
        positions (features [n, feature width] of the head's feature layers,
        and its tokens). Where the run asks for guesses: the head's, from
        where verification will end (the first output that refutes the run's
        next input; greedy and seeded requests, whose target tokens are known
        here), onto the result."""
        started = time.perf_counter()
        line = self.head_lines.setdefault(run.seq_id, HeadLine())
        self.head.extend(line, run.start_pos, features, run.token_ids)
        tokens, first = result.target_token_ids, run.logits_from
        if run.tail_guesses and tokens:
            drafting = time.perf_counter()
            end = first  # the output whose target token verification ends with
            while end + 1 < len(run.token_ids) and run.token_ids[end + 1] == tokens[end - first]:
                end += 1
            result.guesses, result.guess_confidences = self.head.draft(
                line, run.start_pos + end, tokens[end - first], run.tail_guesses, run.sampling, run.tail_floor)
            result.guesses_start = run.start_pos + end + 2  # after the target's token at end + 1
            self.counters.draft_head_tokens += len(result.guesses)
            result.guesses_s = time.perf_counter() - drafting  # what the guesses cost (the line is kept anyway)
        self.counters.draft_head_s += time.perf_counter() - started

    @staticmethod
    def _result(run: Run, logits: torch.Tensor) -> RunResult:
        """Only what verification needs: target tokens, or probs for unseeded sampling."""
        if run.sampling.is_greedy or run.sampling.is_coupled:
            tokens = target_tokens(logits, run.sampling, run.start_pos + run.logits_from + 1)
            return RunResult(run.run_id, run.seq_id, target_token_ids=tokens)
        return RunResult(run.run_id, run.seq_id, target_probs=sampling_probs(logits, run.sampling))


def failed(item: Run | KVOp, failure: Failure) -> RunResult | SequenceFailed:
    """What goes back when `item` failed: a run's failed result, or, for a
    KV op, the failure of its whole sequence."""
    if isinstance(item, Run):
        return RunResult(item.run_id, item.seq_id, failure=failure)
    return SequenceFailed(item.seq_id, failure)


def stage_failure(item: Run | KVOp, stage_index: int, exc: BaseException) -> RunResult | SequenceFailed:
    """The one way every transport reports a stage's exception."""
    return failed(item, Failure.of(exc, FailureCode.STAGE_ERROR, f"stage {stage_index}"))


def result_bytes(result: RunResult) -> int:
    """What a result costs on the wire back to the coordinator."""
    if result.target_probs is not None:
        return result.target_probs.numel() * result.target_probs.element_size()
    return 8 * len(result.target_token_ids or ()) + 12 * len(result.guesses)  # a guess: its id and confidence
