"""The `pipeinfer` command line.

Building the parser imports no torch (its defaults come from modules that
import none): every --help answers at once; a command loads what it needs
when it runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from cluster.spec import DEFAULT_NAME, SpecError
from compute.model_source import ModelSourceError
from compute.options import DEVICE_HELP, DTYPE_NAMES, QUANTIZE_CHOICES, QUANTIZE_HELP
from compute.types import SamplingParams
from draft_models import DRAFT_HELP, DraftSpecError
from draft_models.train_config import TrainConfig
from loadtests.bench_config import BASELINE_KINDS, PROMPT_SETS, BenchConfig, load_prompts
from loadtests.shapes import SHAPES
from pipeline.config import DEFAULT_DRAFT, TRANSPORTS, EngineConfig, choose_defaults
from pipeline.sim_profiles import PROFILES
from pipeline.speculation import SpeculationConfig
from pipeline.types import GenerationError, Mode
from server.settings import DEFAULT_HOST, DEFAULT_PORT, ServerSettings


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "transport", None) == "mpi" and _serve_mpi_stage(args):
            return 0
        return args.handler(args)
    except (ModelSourceError, DraftSpecError, GenerationError, SpecError, ValueError) as exc:
        print(f"pipeinfer: error: {exc}", file=sys.stderr)
        if getattr(args, "transport", None) == "mpi":
            from pipeline.mpi_transport import abort_all_ranks

            abort_all_ranks(2)  # stage ranks would otherwise wait for work forever
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeinfer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate a completion for one prompt")
    _add_engine_args(generate)
    generate.add_argument("--prompt", required=True, help="the prompt text (raw, no chat template)")
    generate.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    sampling = SamplingParams()  # the defaults live there
    generate.add_argument("--temperature", type=float, default=sampling.temperature,
                          help=f"0 = greedy (default {sampling.temperature:g})")
    generate.add_argument("--top-p", type=float, default=sampling.top_p)
    generate.add_argument("--top-k", type=int, default=sampling.top_k, help="0 = off")
    generate.add_argument("--seed", type=int, default=None,
                          help="seeded sampling: the same text in every mode, draft and stage count")
    generate.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    generate.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    generate.set_defaults(handler=_generate)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    _add_engine_args(serve)
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST}: this machine only)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--api-key", action="append", default=None,
                       help="require 'Authorization: Bearer KEY' (repeatable; or $PIPEINFER_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="the model name clients send (default: from --model)")
    limits = ServerSettings(served_model_name="")
    serve.add_argument("--max-running", type=int, default=limits.max_running_requests,
                       help="requests generating at once")
    serve.add_argument("--max-waiting", type=int, default=limits.max_waiting_requests,
                       help="requests queued beyond that before 429")
    serve.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes, help="larger request bodies get 413")
    serve.add_argument("--max-header-bytes", type=int, default=limits.max_header_bytes,
                       help="a larger request head (request line + headers) gets 431")
    serve.add_argument("--max-headers", type=int, default=limits.max_headers, help="more request headers get 431")
    serve.add_argument("--shutdown-grace", type=float, default=limits.shutdown_grace_s, metavar="SECONDS",
                       help="after SIGTERM/SIGINT, running requests may finish for this long, then end with an "
                            "error; a second signal exits at once")
    serve.set_defaults(handler=_serve)

    bench = commands.add_parser("bench", help="measure the modes side by side: results.json, plots, trace")
    _add_engine_args(bench, with_mode=False)
    defaults = {f.name: f.default for f in dataclasses.fields(BenchConfig)}  # the defaults live there
    bench.add_argument("--modes", default=",".join(m.value for m in defaults["modes"]),
                       help="comma-separated modes to compare")
    bench.add_argument("--simulate", default=None, metavar="PROFILE",
                       help=f"run in simulated time on a modelled cluster: {', '.join(PROFILES)}, or a profile .json "
                            "(what --calibrate writes); the profile sets the stages")
    bench.add_argument("--prompts", default=None,
                       help="a shipped set (extractive, chat, everyday: conversations through the chat template), or a file: "
                            "one prompt per line, or JSONL with a \"prompt\" string or a \"messages\" list "
                            "(default: 5 built-in raw prompts)")
    bench.add_argument("--max-tokens", type=int, default=defaults["max_tokens"],
                       help="tokens per request (EOS is ignored)")
    bench.add_argument("--repeat", type=int, default=defaults["repeat"], help="repetitions, interleaved across modes")
    bench.add_argument("--concurrency", default=",".join(map(str, defaults["concurrency"])),
                       help="comma-separated requests in flight, e.g. 1,8")
    bench.add_argument("--baselines", default="",
                       help=f"comma-separated peers to run too: {BASELINE_KINDS} (vllm*: extra pipeinfer[vllm]; "
                            "llama.cpp*: a llama-server, see scripts/build-llama-cpp.sh, and a GGUF model)")
    bench.add_argument("--llama-server", type=Path, default=defaults["llama_server"], metavar="PATH",
                       help="the llama.cpp baselines' llama-server (default: on PATH, else what "
                            "scripts/build-llama-cpp.sh built)")
    bench.add_argument("--out", type=Path, default=defaults["out_dir"], help="output directory")
    bench.add_argument("--calibrate", action="store_true",
                       help="also write OUT/profile.json, this run as a simulation profile: --simulate OUT/profile.json "
                            "replays it (stage times by run size, hops, draft time, all measured)")
    bench.add_argument("--long-prompt", type=int, default=None, metavar="TOKENS",
                       help="also time a short request alone and while a prompt of TOKENS tokens is prefilled "
                            "(results.json 'long_prompt'; chunks: --prefill-chunk)")
    bench.set_defaults(handler=_bench)

    make_pair = commands.add_parser("make-pair", help="build a benchmark target whose layers:N self-draft agrees "
                                                      "with it at a chosen rate (loadtests/pair.py)")
    make_pair.add_argument("--shape", choices=sorted(SHAPES), default="0.7b",
                           help="the target's shape: 0.7b (40 layers, ~0.75B parameters) or tiny (for tests)")
    make_pair.add_argument("--draft-layers", type=int, default=1, help="the self-draft's layers (--draft layers:N)")
    make_pair.add_argument("--agreement", type=float, required=True,
                           help="the rate at which the draft's argmax equals the target's greedy token")
    make_pair.add_argument("--tolerance", type=float, default=0.03, help="how close the measured agreement must be")
    make_pair.add_argument("--stages", type=int, default=4, help="stages the draft's relative cost is given for")
    _add_model_maker_args(make_pair, "the directory to write the target to")
    make_pair.set_defaults(handler=_make_pair)

    make_model = commands.add_parser("make-model", help="write a random Llama of a named shape, a layer at a "
                                                        "time, for speed figures (loadtests/random_model.py)")
    make_model.add_argument("--shape", choices=sorted(SHAPES), required=True,
                            help="8b (Llama-3-8B's decoder with the default tokenizer's vocabulary), 0.7b or tiny")
    _add_model_maker_args(make_model, "the directory to write the model to")
    make_model.set_defaults(handler=_make_model)

    train_draft = commands.add_parser("train-draft", help="train a draft head for a target by self-distillation "
                                                          "(use it with --draft head:DIR)")
    _add_train_args(train_draft)
    train_draft.set_defaults(handler=_train_draft)

    up = commands.add_parser("up", help="start a deployment from a cluster YAML file")
    up.add_argument("spec", help="the cluster YAML file (see examples/)")
    up.add_argument("--foreground", action="store_true", help="stay attached instead of returning once healthy")
    up.set_defaults(handler=lambda args: _cluster_up().up(args.spec, args.foreground))

    plan = commands.add_parser("plan", help="print the layer split and memory per stage, start nothing")
    plan.add_argument("spec", help="the cluster YAML file")
    plan.set_defaults(handler=lambda args: print(_cluster_up().plan(args.spec)) or 0)

    for name, help_text in (("status", "show a deployment's stage map, KV use and requests"),
                            ("down", "stop everything `pipeinfer up` started, and nothing else")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--name", default=DEFAULT_NAME, help="the deployment's name (the spec's `name`)")
        command.set_defaults(handler=lambda args, name=name: getattr(_cluster_up(), name)(args.name))
    return parser


def _cluster_up():
    from cluster import up

    return up


def _add_model_maker_args(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-from", help="copy this model's tokenizer ('default' or a directory); "
                                                 "its vocabulary must be the shape's")
    parser.add_argument("--out", type=Path, required=True, help=out_help)


def _tokenizer_from(args: argparse.Namespace) -> Path | None:
    from compute.model_source import resolve_model

    return resolve_model(args.tokenizer_from) if args.tokenizer_from else None


def _make_pair(args: argparse.Namespace) -> int:
    from loadtests.pair import make_pair

    report = make_pair(args.out, SHAPES[args.shape], args.draft_layers, args.agreement, seed=args.seed,
                       tokenizer_from=_tokenizer_from(args), tolerance=args.tolerance, num_stages=args.stages)
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def _make_model(args: argparse.Namespace) -> int:
    from loadtests.random_model import make_random_model

    report = make_random_model(args.out, SHAPES[args.shape], seed=args.seed, tokenizer_from=_tokenizer_from(args))
    print(json.dumps({"path": str(args.out), "shape": args.shape, **report}, indent=2))
    return 0


def _add_engine_args(parser: argparse.ArgumentParser, with_mode: bool = True) -> None:
    engine, spec = EngineConfig(), SpeculationConfig()  # the defaults live there
    parser.add_argument("--model", default=engine.model,
                        help="'default' (embedded SmolLM2-135M-Instruct), a Hugging Face directory, or a .gguf file")
    # None: the user left it out; choose_defaults fills it in with what measured best (and says why).
    parser.add_argument("--draft", default=None, help=f"the draft (default {DEFAULT_DRAFT}). {DRAFT_HELP}")
    parser.add_argument("--stages", type=int, default=None,
                        help="pipeline stages the layers are split over (default 1)")
    if with_mode:
        parser.add_argument("--mode", choices=[m.value for m in Mode], default=None,
                            help="ar: one token per run; sync: draft k then verify; pipeinfer: continuous speculation "
                                 "(default: sync on one stage, pipeinfer on several, ar without a draft)")
    parser.add_argument("--transport", choices=list(TRANSPORTS), default=engine.transport,
                        help="local: stages as threads in this process; ray: one Ray actor per stage; "
                             "mpi: one MPI rank per stage (launch with mpirun -n STAGES+1)")
    parser.add_argument("--ray-address", default=engine.ray_address,
                        help="ray transport: 'auto' or an address joins a running cluster (default: a private local Ray)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=engine.dtype,
                        help="compute dtype (bfloat16 or float16 on a GPU)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=engine.quantize, help=QUANTIZE_HELP)
    parser.add_argument("--device", default=engine.device,
                        help=f"where every stage computes: {DEVICE_HELP} (default {engine.device})")
    parser.add_argument("--stage-cpus", type=int, default=engine.stage_cpus,
                        help="cores per stage, its torch threads; on one machine each stage is pinned to its own "
                             "(default: the stages split this machine's cores)")
    parser.add_argument("--draft-cpus", type=int, default=engine.draft_cpus,
                        help="cores of a draft that computes (it runs on a thread, actor or rank of its own)")
    parser.add_argument("--kv-budget-bytes", type=int, default=engine.kv_budget_bytes,
                        help="per stage: refuse new requests while this much KV is in use (default: no limit)")
    parser.add_argument("--draft-len", type=int, default=spec.draft_len, help="most draft tokens per run")
    parser.add_argument("--max-in-flight", type=int, default=spec.max_runs_in_flight,
                        help="most runs in flight per request (pipeinfer mode; default: one per stage plus one)")
    parser.add_argument("--min-accept-prob", type=float, default=spec.min_accept_prob,
                        help="pipeinfer mode launches a guess while the measured chance that it, and every guess "
                             "before it, is accepted stays at least this (default: 1 / the model's layers, times the "
                             "requests running)")
    parser.add_argument("--prefill-chunk", type=int, default=spec.prefill_chunk,
                        help="a longer prompt goes through the stages in chunks of this many tokens, sharing each "
                             "forward with the other requests (smaller: less wait for them, a slower long prompt)")


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    mode = getattr(args, "mode", None)
    draft, num_stages, mode, defaulted = choose_defaults(args.draft, args.stages, mode and Mode(mode))
    speculation = SpeculationConfig(mode=mode, draft_len=args.draft_len, max_runs_in_flight=args.max_in_flight,
                                    min_accept_prob=args.min_accept_prob, prefill_chunk=args.prefill_chunk)
    return EngineConfig(model=args.model, draft=draft, num_stages=num_stages, dtype=args.dtype, device=args.device,
                        quantize=args.quantize, transport=args.transport, ray_address=args.ray_address,
                        kv_budget_bytes=args.kv_budget_bytes, stage_cpus=args.stage_cpus,
                        draft_cpus=args.draft_cpus, speculation=speculation, simulate=getattr(args, "simulate", None),
                        defaulted=defaulted)


def _serve_mpi_stage(args: argparse.Namespace) -> bool:
    """Under mpirun every rank runs this command: ranks 1..N become the stages
    and rank N+1 the draft, if it computes (each returns True when told to
    stop); rank 0 goes on as the coordinator. A wrong rank count is reported
    by rank 0, which then aborts the job."""
    from compute.model_source import resolve_model
    from pipeline.mpi_transport import (
        check_rank_count,
        mpi_rank_and_size,
        run_draft_worker,
        run_stage_worker,
    )

    config = _engine_config(args)
    rank, _ = mpi_rank_and_size()
    if rank == 0:
        check_rank_count(config.num_stages, config.draft_has_worker)  # before loading anything; the error aborts every rank
        return False
    model_dir = resolve_model(config.model, show_progress=False)
    plans = config.plans(model_dir)  # the split rank 0's engine makes
    if rank == config.num_stages + 1:
        run_draft_worker(config.draft, str(model_dir), config.dtype, config.draft_cpus,
                         [int(plan.num_cpus) for plan in plans])
        return True
    run_stage_worker(str(model_dir), plans, config.dtype, config.kv_budget_bytes)
    return True


def _generate(args: argparse.Namespace) -> int:
    from pipeline.engine import Engine

    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    with Engine.load(_engine_config(args), show_progress=True) as engine:
        output = engine.complete_text(args.prompt, args.max_tokens, sampling, ignore_eos=args.ignore_eos)
        weights = [stats["weight_format"] for stats in engine.stage_stats()]
    if args.json:
        stats = output.stats.as_dict()
        print(json.dumps({"text": output.text, "token_ids": output.token_ids,
                          "finish_reason": output.finish_reason, "stats": stats, "weights": weights}))
    else:
        print(output.text)
    return 0


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--model", default=defaults.model, help="the target: 'default', a Hugging Face directory "
                        "or a .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="directory for the head, its data, checkpoint and "
                        "plot (a rerun resumes there)")
    parser.add_argument("--num-prompts", type=int, default=defaults.num_prompts,
                        help="prompts the target answers: the first N of the prompt set "
                        "(draft_models/training_prompts.py: 759 requests, then 23,255 questions people asked, "
                        "from chitchat-dataset); a tenth of each of its two blocks held out")
    parser.add_argument("--target-prompts", type=int, default=defaults.target_prompts,
                        help="more prompts, written by the target itself (it continues a list of the project's "
                        "requests with one more), answered after the first --num-prompts; a tenth held out")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="tokens per answer")
    parser.add_argument("--sampled-share", type=float, default=defaults.sampled_share,
                        help="share of answers sampled (temperature 0.7) rather than greedy")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="conversations per step")
    parser.add_argument("--depth", type=int, default=defaults.depth, help="draft steps unrolled per position")
    parser.add_argument("--draft-vocab", type=int, default=defaults.draft_vocab,
                        help="tokens the head predicts (those the target writes most)")
    parser.add_argument("--soft-weight", type=float, default=defaults.soft_weight,
                        help="share of the loss on the target's top tokens (soft labels) beside its greedy token")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--init", default=defaults.init, metavar="HEAD",
                        help="start from this head (head:default or head:DIR; its draft vocabulary is kept): "
                        "fine-tuning instead of training from scratch")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every,
                        help="steps between held-out measurements and checkpoints")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=None, help=f"{DEVICE_HELP} (default: cuda where present, else cpu)")


def _bench_prompt_texts() -> tuple[str, ...]:
    """What the shipped bench sets ask: train-draft's target-written prompts may not be one of them."""
    return tuple(content for name in PROMPT_SETS for prompt in load_prompts(name) for _, content in prompt)


def _train_draft(args: argparse.Namespace) -> int:
    import torch

    from compute.backend import torch_device
    from draft_models.distill import train

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = TrainConfig(model=args.model, out_dir=args.out, num_prompts=args.num_prompts,
                         target_prompts=args.target_prompts, reserved=_bench_prompt_texts(),
                         max_new_tokens=args.max_new_tokens, sampled_share=args.sampled_share, steps=args.steps,
                         batch=args.batch, depth=args.depth, draft_vocab=args.draft_vocab, soft_weight=args.soft_weight, lr=args.lr,
                         init=args.init, eval_every=args.eval_every, seed=args.seed, device=str(torch_device(device)))
    summary = train(config)
    accepted = " ".join(f"{a:.2f}" for a in summary["acceptance_by_depth"])
    print(f"head in {args.out}: {summary['head_params'] / 1e6:.1f} M parameters; held-out acceptance by depth "
          f"{accepted} (mean accepted length {summary['mean_accepted_len']} from any position, "
          f"{summary['sync_loop_accepted_len']:.2f} in sync's loop); {summary['seconds_this_run']} s; "
          f"use it with --draft head:{args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from loadtests.bench import run_bench
    from loadtests.bench_config import DEFAULT_PROMPTS, load_prompts

    try:
        modes = tuple(Mode(m) for m in _csv(args.modes))
        concurrency = tuple(int(c) for c in _csv(args.concurrency))
    except ValueError:
        raise ValueError(f"--modes takes {', '.join(m.value for m in Mode)}; --concurrency integers") from None
    config = BenchConfig(engine=_engine_config(args), modes=modes,
                         prompts=load_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS,
                         max_tokens=args.max_tokens, repeat=args.repeat, concurrency=concurrency,
                         out_dir=args.out, baselines=tuple(_csv(args.baselines)), llama_server=args.llama_server,
                         calibrate=args.calibrate,
                         long_prompt=args.long_prompt)
    results = run_bench(config, show_progress=True)
    print(format_summary(results))
    if "draft_head" in results:
        head = results["draft_head"]
        against = "" if head["frac_of_target_forward"] is None else (
            f" = {head['frac_of_target_forward']:.3f} of a one-token target forward ({head['target_forward_ms']} ms, ar mode)")
        print(f"draft head on the last stage: {head['ms_per_guess']} ms a guess ({head['guesses']} guesses){against}")
    if "long_prompt" in results:
        lp = results["long_prompt"]
        print(f"a {lp['short_tokens']}-token request: {lp['short_alone_ms']} ms alone, {lp['short_during_ms']} ms during "
              f"a {lp['long_prompt_tokens']}-token prompt (3x alone + one {lp['prefill_chunk']}-token chunk: "
              f"{lp['bound_ms']} ms); the long prompt's first token after {lp['long_first_token_s']} s")
    print(f"wrote {args.out / 'results.json'} and " + ", ".join(str(args.out / f) for f in results["files"].values()))
    return 0


SUMMARY_COLUMNS = ("tokens_per_s", "ttft_ms_p50", "itl_ms_p50", "itl_ms_p99", "acceptance_rate",
                   "mean_accepted_len", "runs_cancelled_frac", "wasted_stage_compute_frac", "bytes_per_token",
                   "fraction_of_floor")


def format_summary(results: dict) -> str:
    from cluster.layout import format_table

    rows = [("mode", *SUMMARY_COLUMNS)]
    for name, figures in results["modes"].items():
        rows.append((name, *("-" if figures.get(c) is None else f"{figures[c]:g}" for c in SUMMARY_COLUMNS)))
    ratios = "  ".join(f"{k} {v:.2f}x" for k, v in results["ratios"].items() if v is not None)
    bandwidth = "  ".join(f"{name} " + "/".join("-" if f is None else f"{f:.2f}" for f in figures["stage_bandwidth_frac"])
                          for name, figures in results["modes"].items() if figures.get("stage_bandwidth_frac"))
    if bandwidth:
        reads = "/".join(f"{b:g}" for b in results["setup"]["stage_read_gb_per_s"])
        bandwidth = (f"\nshare of the bandwidth floor per stage (decode forwards; its cores read {reads} GB/s, "
                     f"the machine {results['setup']['machine']['read_gb_per_s']}): {bandwidth}")
    hops = (results.get("hops") or {}).get("measured")
    if hops:
        bandwidth += (f"\na hop: {hops['ms_per_hop_p50']:g} ms (a ping's round trip through the idle pipeline, "
                      f"{hops['round_trip_ms_p50']:g} ms over {hops['hops']} hops)")
    return f"{format_table(rows)}\n{ratios}{bandwidth}"


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _serve(args: argparse.Namespace) -> int:
    from cluster.serve import serve, served_name

    api_keys = tuple(args.api_key or ([os.environ["PIPEINFER_API_KEY"]] if os.environ.get("PIPEINFER_API_KEY") else []))
    settings = ServerSettings(
        served_model_name=args.served_model_name or served_name(args.model), api_keys=api_keys,
        max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
        max_running_requests=args.max_running, max_waiting_requests=args.max_waiting,
        shutdown_grace_s=args.shutdown_grace)
    serve(_engine_config(args), host=args.host, port=args.port, settings=settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
