"""The `pipeinfer` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from draft_models import DraftSpecError
from pipeline.engine import DTYPES, Engine, EngineConfig, GenerationError
from pipeline.model_source import ModelSourceError
from pipeline.speculation import SpeculationConfig
from pipeline.types import Mode, SamplingParams


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ModelSourceError, DraftSpecError, GenerationError, ValueError) as exc:
        print(f"pipeinfer: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeinfer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate a completion for one prompt")
    _add_engine_args(generate)
    generate.add_argument("--prompt", required=True, help="the prompt text (raw, no chat template)")
    generate.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0, help="0 = off")
    generate.add_argument("--seed", type=int, default=None,
                          help="seeded sampling: the same text in every mode, draft and stage count")
    generate.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    generate.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    generate.set_defaults(handler=_generate)
    return parser


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    spec = SpeculationConfig()
    parser.add_argument("--model", default="default",
                        help="'default' (embedded SmolLM2-135M-Instruct), a Hugging Face directory, or a .gguf file")
    parser.add_argument("--draft", default="none",
                        help="none | ngram | layers:N | int8 | PATH to a smaller model with the same tokenizer")
    parser.add_argument("--stages", type=int, default=1, help="pipeline stages the layers are split over")
    parser.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.PIPEINFER.value,
                        help="ar: one token per run; sync: draft k then verify; pipeinfer: continuous speculation")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--draft-len", type=int, default=spec.draft_len, help="most draft tokens per run")
    parser.add_argument("--max-in-flight", type=int, default=spec.max_runs_in_flight,
                        help="most runs in flight per request (pipeinfer mode)")
    parser.add_argument("--cutoff", type=float, default=spec.confidence_cutoff,
                        help="draft confidence below which pipeinfer mode stops drafting")


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    speculation = SpeculationConfig(mode=Mode(args.mode), draft_len=args.draft_len,
                                    max_runs_in_flight=args.max_in_flight, confidence_cutoff=args.cutoff)
    return EngineConfig(model=args.model, draft=args.draft, num_stages=args.stages, dtype=args.dtype,
                        speculation=speculation)


def _generate(args: argparse.Namespace) -> int:
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    with Engine.load(_engine_config(args), show_progress=True) as engine:
        output = engine.complete_text(args.prompt, args.max_tokens, sampling, ignore_eos=args.ignore_eos)
    if args.json:
        stats = output.stats.as_dict()
        print(json.dumps({"text": output.text, "token_ids": output.token_ids,
                          "finish_reason": output.finish_reason, "stats": stats}))
    else:
        print(output.text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
