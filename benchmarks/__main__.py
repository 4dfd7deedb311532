"""``python -m benchmarks``: the load generator and the sweep of ``make bench``.

    # one run: start a target, send 16 single-photo requests, 4 at a time, write one JSON
    python -m benchmarks run --target reference --max-concurrency 4 --num-requests 16 --out bench-results
    # against a server that is already up (any OpenAI-compatible endpoint)
    python -m benchmarks run --base-url http://127.0.0.1:8000/v1 --scenario consult --num-requests 4
    # open loop: Poisson arrivals, 2 conversations per second
    python -m benchmarks run --target embedded --request-rate 2 --max-concurrency 64 --num-requests 40
    # every target x concurrency 1, 4, 16, 32 (+ consult, + phone): JSON per run, summary, PNG, Markdown
    python -m benchmarks sweep --out bench-results
    # the same 96 requests through `skingpt4 batch` and the embedded server (32 at once)
    python -m benchmarks batch-vs-server --num-requests 96 --concurrency 32 --out bench-results/batch
    # live requests' TTFT at concurrency 4, alone and while a 200-line Batch API batch runs
    python -m benchmarks live-vs-batch --num-requests 48 --concurrency 4 --batch-lines 200 --out bench-results/live-batch
    # where the engine's CPU goes (py-spy on vLLM's engine processes) at concurrency 1 and 32
    python -m benchmarks profile --concurrency 1,32 --out bench-results/profile
    # where Ray's front end's CPU goes (proxy, ingress, LLM replica actor)
    python -m benchmarks profile --target ray --processes front --concurrency 32 --rate 100 --out bench-results/profile-ray
    # the pinned layout: the engine alone on the last core, the front end and the client on the rest
    python -m benchmarks sweep --targets embedded,ray --pin-engine --concurrency 32 --out bench-results/pinned
    # 12 MP phone photos, 32 at once: this project, plain vLLM, and an older checkout of it
    git worktree add ../before 3cb75e0
    python -m benchmarks sweep --targets embedded,vllm --before-checkout ../before \
        --concurrency '' --consult-concurrency '' --out bench-results/phone

Without ``--model``, the ``bench`` preset's checkpoint is built into ``artifacts/bench-<family>``
when missing (or built before its tokenizer was word-level: then rebuilt). ``--num-requests`` counts conversations: one request each, four in ``consult``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import sys
from pathlib import Path

from benchmarks.batch_compare import CompareConfig, compare_markdown, run_compare
from benchmarks.live_batch import LiveBatchConfig, run_live_vs_batch
from benchmarks.live_batch import markdown as live_markdown
from benchmarks.loadgen import LoadConfig, make_client, warm_up
from benchmarks.pinning import Layout
from benchmarks.profile import PROCESSES, ProfileConfig, main_profile
from benchmarks.profile import markdown as profile_markdown
from benchmarks.report import run_record, summary_of, write_json
from benchmarks.scenarios import (
    DEFAULT_IMAGE_SIZE,
    SCENARIOS,
    build_conversations,
    default_image_size,
    parse_image_size,
)
from benchmarks.sweep import WARMUP_SEED, SweepConfig, measure, run_sweep
from benchmarks.targets import (
    CHECKOUT_TARGETS,
    TARGETS,
    ExternalTarget,
    LaunchedTarget,
    Target,
    api_key,
)
from encoders.presets import LLM_FAMILIES

ARTIFACTS = Path("artifacts")


def ensure_model(model: Path | None, family: str) -> Path:
    """``model`` as given, or the ``bench`` checkpoint of ``family`` (built on first use)."""
    if model is not None:
        return model
    path = ARTIFACTS / f"bench-{family}"
    if not (path / "config.json").exists() or not has_word_tokenizer(path):
        from plugins.skingpt4.checkpoint import write_tiny_checkpoint

        print(f"building the bench checkpoint in {path}", file=sys.stderr)
        write_tiny_checkpoint(path, preset="bench", family=family)
    return path


def has_word_tokenizer(folder: Path) -> bool:
    """Whether ``folder``'s tokenizer is the word-level one of today's ``bench`` checkpoints
    (earlier ones had a byte-level BPE, whose answers do not re-tokenize as generated)."""
    try:
        spec = json.loads((folder / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    return spec.get("model", {}).get("type") == "WordLevel"


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown targets {unknown}; choose from {TARGETS}")
    return names


def _checkout(text: str) -> Path:
    path = Path(text)
    # serving/cli.py before serving/ was split into layers, serving/cli/__init__.py after
    if not any((path / "serving" / cli).is_file() for cli in ("cli.py", "cli/__init__.py")):
        raise argparse.ArgumentTypeError(f"{text} is not a checkout of this project (no serving/cli)")
    return path.resolve()


def _endpoint(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not url.startswith("http"):
        raise argparse.ArgumentTypeError(f"endpoint {text!r} is not NAME=http://HOST:PORT/v1")
    return name, url


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="model folder (default: artifacts/bench-<family>)")
    p.add_argument("--family", choices=LLM_FAMILIES, default="llama")
    p.add_argument("--max-tokens", type=int, default=SweepConfig.max_tokens)
    p.add_argument("--temperature", type=float, default=SweepConfig.temperature, help="0: greedy (same lengths on every target)")
    p.add_argument("--image-size", type=parse_image_size, default=None,
                   help="WxH of the generated photos (default 512x384; phone: 4000x3000)")
    p.add_argument("--before-checkout", type=_checkout, default=None,
                   help="a checkout of an older commit (git worktree add DIR 3cb75e0): the 'before' target runs its server")
    p.add_argument("--warmup-requests", type=int, default=SweepConfig.warmup_requests)
    p.add_argument("--max-duration-s", type=float, default=None, help="start no conversation after this")
    p.add_argument("--startup-timeout-s", type=float, default=SweepConfig.startup_timeout_s)
    p.add_argument("--request-timeout-s", type=float, default=SweepConfig.request_timeout_s)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-session-id", dest="session_ids", action="store_false",
                   help="send no x-session-id header (Ray then routes a consult's turns by prefix)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench-results"))


def _pin_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pin-engine", type=int, nargs="?", const=1, default=None, metavar="N",
                   help="the pinned layout: vLLM's engine processes on the last N CPUs (default 1), "
                   "everything else and the client on the rest (benchmarks/pinning.py)")


def _layout(args) -> Layout | None:
    if not args.pin_engine:
        return None
    try:
        return Layout.split(args.pin_engine)
    except ValueError as exc:
        raise SystemExit(f"python -m benchmarks: {exc}") from None


def _stream_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="ask for whole answers instead of streamed ones (TTFT = latency, no TPOT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="one scenario against one target")
    run.add_argument("--target", choices=TARGETS, default=None, help="start this target (or label --base-url)")
    run.add_argument("--base-url", default=None, help="an endpoint already running; nothing is started")
    run.add_argument("--scenario", choices=SCENARIOS, default="single")
    run.add_argument("--max-concurrency", type=int, default=1)
    run.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default inf)")
    run.add_argument("--num-requests", type=int, default=16)
    _stream_flag(run)
    _pin_flag(run)
    _common(run)

    sweep = sub.add_parser("sweep", help="all targets x concurrency levels; JSON, PNG, Markdown")
    sweep.add_argument("--targets", type=_name_list, default=SweepConfig.targets)
    sweep.add_argument("--concurrency", type=_int_list, default=SweepConfig.concurrency)
    sweep.add_argument("--scenario", choices=[s for s in SCENARIOS if s != "phone"], default="single",
                       help="the scenario swept over concurrency (phone has its own levels: --phone-concurrency)")
    sweep.add_argument("--num-requests", type=int, default=None, help="per level (default max(16, 3 x concurrency))")
    sweep.add_argument("--consult-concurrency", type=_int_list, default=SweepConfig.consult_concurrency, help="'' to skip the consult runs")
    sweep.add_argument("--consult-conversations", type=int, default=SweepConfig.consult_conversations)
    sweep.add_argument("--phone-concurrency", type=_int_list, default=SweepConfig.phone_concurrency, help="'' to skip the phone runs")
    sweep.add_argument("--phone-requests", type=int, default=None, help="per phone level (default: its concurrency, at least 16)")
    sweep.add_argument("--phone-targets", type=_name_list, default=SweepConfig.phone_targets, help="which targets run the phone scenario")
    sweep.add_argument("--phone-image-size", type=parse_image_size, default=SweepConfig.phone_image_size)
    sweep.add_argument("--budget-s", type=float, default=SweepConfig.budget_s, help="bound on the whole sweep")
    sweep.add_argument("--endpoint", type=_endpoint, action="append", default=[], help="NAME=URL: use, don't start")
    _stream_flag(sweep)
    _pin_flag(sweep)
    _common(sweep)
    sweep.set_defaults(max_duration_s=SweepConfig.max_duration_s)

    compare = sub.add_parser("batch-vs-server", help="the same requests through skingpt4 batch and the embedded server")
    compare.add_argument("--num-requests", type=int, default=CompareConfig.num_requests)
    compare.add_argument("--concurrency", type=int, default=CompareConfig.concurrency, help="the server's")
    compare.add_argument("--batch-concurrency", type=int, default=None,
                         help="skingpt4 batch --max-concurrency (default: the command's own)")
    _common(compare)

    live = sub.add_parser("live-vs-batch", help="live requests' TTFT with and without a Batch API batch running")
    live.add_argument("--num-requests", type=int, default=LiveBatchConfig.num_requests, help="live requests per run")
    live.add_argument("--concurrency", type=int, default=LiveBatchConfig.concurrency, help="the live requests'")
    live.add_argument("--batch-lines", type=int, default=LiveBatchConfig.batch_lines)
    live.add_argument("--batch-max-inflight", type=int, default=None,
                      help="serve --batch-max-inflight (default: the server's)")
    _common(live)

    prof = sub.add_parser("profile", help="py-spy samples of the engine's (or the front end's) processes "
                                          "under load, by category")
    prof.add_argument("--target", choices=TARGETS, default=ProfileConfig.target)
    prof.add_argument("--concurrency", type=_int_list, default=ProfileConfig.concurrency)
    prof.add_argument("--num-requests", type=int, default=None, help="per level (default max(16, 3 x concurrency))")
    prof.add_argument("--rate", type=int, default=ProfileConfig.rate, help="py-spy samples per second")
    prof.add_argument("--processes", choices=PROCESSES, default=ProfileConfig.processes,
                      help="sample vLLM's engine processes, the front end's (API server, Ray's proxy, "
                           "ingress and replica actors), or all")
    _stream_flag(prof)
    _pin_flag(prof)
    _common(prof)
    return parser


async def _measure(args, server) -> dict:
    client = make_client(server.base_url, args.request_timeout_s, api_key())
    config = LoadConfig(
        max_concurrency=args.max_concurrency, request_rate=args.request_rate,
        max_duration_s=args.max_duration_s, max_tokens=args.max_tokens, temperature=args.temperature,
        seed=args.seed, show_progress=not args.no_progress, session_ids=args.session_ids,
        stream=args.stream,
    )
    size = args.image_size or default_image_size(args.scenario)
    convs = build_conversations(args.scenario, args.num_requests, size, args.seed)
    warm = build_conversations("single", args.warmup_requests, DEFAULT_IMAGE_SIZE, WARMUP_SEED)
    try:
        await warm_up(client, server.model, warm, config)
        load, usage = await measure(server, client, convs, config, label=f"{server.name} {args.scenario}")
    finally:
        await client.close()
    return run_record(
        target=server.name, model=server.model, scenario=args.scenario, config=config, load=load,
        num_conversations=len(convs), image_size=size, server=usage,
    )


def _mib(value: int | float | None, scale: float = 2**-20) -> str:
    return "n/a" if value is None else f"{value * scale:.0f}"


def cmd_run(args) -> int:
    if args.base_url:
        if args.pin_engine:
            raise SystemExit("python -m benchmarks run: --pin-engine pins a target it starts, not --base-url")
        server = ExternalTarget(args.target or "external", args.base_url)
    elif args.target:
        checkout = args.before_checkout if args.target in CHECKOUT_TARGETS else None
        try:
            target = Target.named(args.target, ensure_model(args.model, args.family), checkout=checkout)
        except ValueError as exc:
            raise SystemExit(f"python -m benchmarks run: {exc}") from None
        server = LaunchedTarget(target, args.out / "logs" / f"{args.target}.log", args.startup_timeout_s,
                                layout=_layout(args))
    else:
        raise SystemExit("give --target to start one, or --base-url for a running endpoint")
    with server:
        record = asyncio.run(_measure(args, server))
    rate = "" if math.isinf(args.request_rate) else f"-r{args.request_rate:g}"
    path = write_json(args.out / f"{record['target']}-{args.scenario}-c{args.max_concurrency}{rate}.json", record)
    s = summary_of(record)
    print(
        f"{path}: {s['completed']} completed, {s['failed']} failed ({s['rejected_503']} with 503) in "
        f"{s['duration']:.1f} s; {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} tok/s, "
        f"median TTFT {s['median_ttft_ms']:.0f} ms, median TPOT {s['median_tpot_ms']:.1f} ms, "
        f"client CPU {100 * s['client_cpu_share']:.0f}%; server: API CPU "
        f"{_mib(s['api_cpu_ms_per_photo'], 1)} ms/photo, peak RSS {_mib(s['peak_rss_bytes'])} MiB "
        f"(idle {_mib(s['idle_rss_bytes'])} MiB)"
    )
    return 0 if s["failed"] == 0 else 1


def _sweep_targets(args) -> tuple[str, ...]:
    targets = args.targets
    if args.before_checkout is not None and "before" not in targets:
        targets = (*targets, "before")
    if "before" in targets and args.before_checkout is None:
        raise SystemExit("python -m benchmarks sweep: target 'before' needs --before-checkout DIR")
    return targets


def cmd_sweep(args, argv: list[str]) -> int:
    _layout(args)  # refuses a layout this machine cannot hold, before anything starts
    cfg = SweepConfig(
        out=args.out, model=ensure_model(args.model, args.family), targets=_sweep_targets(args),
        concurrency=args.concurrency, scenario=args.scenario, num_requests=args.num_requests,
        consult_concurrency=args.consult_concurrency, consult_conversations=args.consult_conversations,
        phone_concurrency=args.phone_concurrency, phone_requests=args.phone_requests,
        phone_targets=args.phone_targets, phone_image_size=args.phone_image_size,
        before_checkout=args.before_checkout,
        max_tokens=args.max_tokens, temperature=args.temperature, image_size=args.image_size or DEFAULT_IMAGE_SIZE,
        warmup_requests=args.warmup_requests, max_duration_s=args.max_duration_s, budget_s=args.budget_s,
        startup_timeout_s=args.startup_timeout_s, request_timeout_s=args.request_timeout_s,
        endpoints=dict(args.endpoint), seed=args.seed, session_ids=args.session_ids,
        stream=args.stream, show_progress=not args.no_progress, pin_engine=args.pin_engine,
        command="python -m benchmarks " + shlex.join(argv),
    )
    summary = run_sweep(cfg)
    print(f"{summary['files']['markdown']}, {summary['files']['png']}, {summary['files']['summary']}")
    for name, why in summary["failures"].items():
        print(f"not run: {name}: {why.splitlines()[0] if why else ''}", file=sys.stderr)
    return 0 if summary["runs"] else 1


def cmd_compare(args, argv: list[str]) -> int:
    cfg = CompareConfig(
        out=args.out, model=ensure_model(args.model, args.family), num_requests=args.num_requests,
        concurrency=args.concurrency, batch_concurrency=args.batch_concurrency,
        max_tokens=args.max_tokens, temperature=args.temperature,
        image_size=args.image_size or DEFAULT_IMAGE_SIZE, seed=args.seed,
        warmup_requests=args.warmup_requests, startup_timeout_s=args.startup_timeout_s,
        request_timeout_s=args.request_timeout_s, show_progress=not args.no_progress,
        command="python -m benchmarks " + shlex.join(argv),
    )
    summary = run_compare(cfg)
    print(compare_markdown(summary))
    print(f"{cfg.out / 'batch-vs-server.json'}, {cfg.out / 'batch-vs-server.png'}")
    return 0 if summary["batch"]["failed"] == 0 and summary["server"]["failed"] == 0 else 1


def cmd_live(args, argv: list[str]) -> int:
    cfg = LiveBatchConfig(
        out=args.out, model=ensure_model(args.model, args.family), num_requests=args.num_requests,
        concurrency=args.concurrency, batch_lines=args.batch_lines,
        batch_max_inflight=args.batch_max_inflight, max_tokens=args.max_tokens,
        temperature=args.temperature, image_size=args.image_size or DEFAULT_IMAGE_SIZE,
        seed=args.seed, warmup_requests=args.warmup_requests,
        startup_timeout_s=args.startup_timeout_s, request_timeout_s=args.request_timeout_s,
        show_progress=not args.no_progress, command="python -m benchmarks " + shlex.join(argv),
    )
    summary = run_live_vs_batch(cfg)
    print(live_markdown(summary))
    print(f"{cfg.out / 'live-vs-batch.json'}, {cfg.out / 'live-vs-batch.png'}")
    return 0 if summary["batch"]["status"] == "completed" else 1


def cmd_profile(args, argv: list[str]) -> int:
    cfg = ProfileConfig(
        out=args.out, model=ensure_model(args.model, args.family), target=args.target,
        checkout=args.before_checkout if args.target in CHECKOUT_TARGETS else None,
        concurrency=args.concurrency, num_requests=args.num_requests, max_tokens=args.max_tokens,
        image_size=args.image_size or DEFAULT_IMAGE_SIZE, rate=args.rate,
        startup_timeout_s=args.startup_timeout_s, request_timeout_s=args.request_timeout_s,
        seed=args.seed, layout=_layout(args), processes=args.processes, stream=args.stream,
        command="python -m benchmarks " + shlex.join(argv),
    )
    summary = main_profile(cfg)
    print(profile_markdown(summary))
    print(f"{cfg.out / 'profile.json'}, {cfg.out / 'profile.md'}")
    return 0 if all(r["answered"] == r["requests"] for r in summary["runs"]) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "batch-vs-server":
        return cmd_compare(args, argv)
    if args.command == "live-vs-batch":
        return cmd_live(args, argv)
    if args.command == "profile":
        return cmd_profile(args, argv)
    return cmd_sweep(args, argv)


if __name__ == "__main__":
    sys.exit(main())
