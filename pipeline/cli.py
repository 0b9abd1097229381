"""``videosearch``: argument parsing only; every command calls the library code."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from xclip_core.label_prompts import DEFAULT_TEMPLATE, check_template

from .cluster import commands as cluster_commands
from .cluster.submit import ClusterError
from .embed.options import (
    COMPILES,
    DECODE_DEVICES,
    IN_PROCESS_MAX_CPUS,
    IN_PROCESS_MAX_OBJECTS,
    SAMPLINGS,
    EmbedOptions,
)
from .flags import EXECUTORS, PRECISIONS
from .library.index import KINDS as INDEX_KINDS
from .library.manifest import GRACE_S, LibraryError, WorseVersionError
from .search.service.options import ServiceOptions
from .storage import StorageError, StorageOptions
from .train.config import TrainConfig
from .train.options import IN_PROCESS_MAX_CLIP_BYTES, TrainOptions

if TYPE_CHECKING:
    from xclip_core.config import XCLIPConfig


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("object storage (default: the standard AWS environment and config)")
    group.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    group.add_argument("--profile", help="credentials profile (else AWS_PROFILE)")
    group.add_argument("--region", help="region (else AWS_REGION / AWS_DEFAULT_REGION)")
    group.add_argument("--anon", action="store_true", help="anonymous access to public buckets")


def _template(value: str) -> str:
    """A ``--template`` that makes a prompt of any label (else argparse's one-line usage error)."""
    try:
        return check_template(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _storage(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions.from_env_and_flags(
        endpoint_url=args.endpoint_url, profile=args.profile, anon=args.anon, region=args.region
    )


def _default(options: type, name: str) -> Any:
    """The default of field ``name`` of an options dataclass: the one place a default is written."""
    return next(f.default for f in dataclasses.fields(options) if f.name == name)


def _embed_flags(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``embed`` and ``refresh``."""
    parser.add_argument(
        "source", help="prefix or glob of videos: /data/videos/, s3://bucket/prefix/, 'gs://b/*.mp4'"
    )
    parser.add_argument("library", help="where the library is written: a local path or s3://bucket/library")
    parser.add_argument("--model", help="X-CLIP checkpoint directory or URL (default: the bundled model)")
    parser.add_argument("--frames", type=int, help="frames per video or segment (default: the model's)")
    parser.add_argument("--segment", type=float, metavar="SECONDS", help="embed segments of this length")
    parser.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default=_default(EmbedOptions, "sampling"),
        help="exact: X-CLIP's uniform sampling and resize (default); fast: the cheapest frames (keyframes) "
        "within half a sampling interval of each, the time error recorded per row, resized by FFmpeg",
    )
    parser.add_argument(
        "--decode-device",
        choices=DECODE_DEVICES,
        default=_default(EmbedOptions, "decode_device"),
        help="cpu: FFmpeg's software decoders (default); cuda: the GPU's video decoder (NVDEC), decoders on "
        "the GPU nodes",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=_default(EmbedOptions, "batch_size"),
        help="videos per encoder call (default %(default)s)",
    )
    parser.add_argument(
        "--compile",
        choices=COMPILES,
        default=_default(EmbedOptions, "compile"),
        help="run the video encoder through torch.compile (1.14-1.33x on CPUs; compiling takes ~5-40 s per "
        "encoder); auto (the default): a CPU encoder with at least 10 minutes of encoding",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=_default(EmbedOptions, "precision"),
        help="the video encoder's arithmetic: auto (the default): bf16 on a GPU, fp32 on CPUs (the "
        "reference's embeddings); bf16 on CPUs too: ~2.2x the encoding rate of CPUs with AVX512-BF16 or AMX, "
        "embeddings within bf16's rounding",
    )
    parser.add_argument("--decoders", type=int, help="decode actors (default: from the cluster's CPUs)")
    parser.add_argument("--encoders", type=int, help="encode actors (default: one per GPU, else 1)")
    parser.add_argument("--gpus-per-encoder", type=float, help="GPUs per encode actor (default 1 if any)")
    parser.add_argument("--address", help="Ray address (default: start a local Ray)")
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=_default(EmbedOptions, "executor"),
        help="where the stages run: on Ray, or in this process without Ray; auto (the default): in this "
        f"process when no cluster is to be joined and at most {IN_PROCESS_MAX_OBJECTS} objects are new or "
        f"this machine has at most {IN_PROCESS_MAX_CPUS} CPUs",
    )
    parser.add_argument(
        "--stage-label",
        metavar="KEY",
        default=_default(EmbedOptions, "stage_label"),
        help="nodes labelled KEY=decode and KEY=encode run that stage only, when the cluster has both "
        "('' ignores labels; default %(default)s)",
    )
    parser.add_argument(
        "--allow-worse",
        action="store_true",
        help="publish even a version with nothing embedded, or far more failures, than the current one",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    _storage_flags(parser)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="videosearch", description="Embed videos with X-CLIP on Ray and search them by text."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed", help="publish a library version of every video under SOURCE (any fsspec storage)"
    )
    _embed_flags(embed)
    embed.set_defaults(retry_failed=True)
    refresh = commands.add_parser(
        "refresh", help="embed only what changed under SOURCE since the library's current version"
    )
    _embed_flags(refresh)
    refresh.add_argument(
        "--no-retry-failed",
        dest="retry_failed",
        action="store_false",
        help="keep the error rows of videos that failed before (default: try them again)",
    )

    gc = commands.add_parser("gc", help="delete the files that no kept version of a library names")
    gc.add_argument("library")
    gc.add_argument("--keep", type=int, default=1, help="versions kept: the current one and those before it")
    gc.add_argument(
        "--grace",
        type=float,
        default=GRACE_S,
        metavar="SECONDS",
        help="spare files younger than this, and versions replaced less than this ago (default %(default)g)",
    )
    gc.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    gc.add_argument("--json", action="store_true", help="print the result as JSON")
    _storage_flags(gc)

    reindex = commands.add_parser(
        "reindex", help="publish the current version again with a FAISS index built anew (e.g. another kind)"
    )
    reindex.add_argument("library")
    reindex.add_argument(
        "--kind", default="auto", choices=["auto", *INDEX_KINDS], help="index kind (default: by size)"
    )
    reindex.add_argument("--json", action="store_true", help="print the new version as JSON")
    _storage_flags(reindex)
    check = commands.add_parser(
        "check", help="read every file of a library version, held against its manifest (exit 1: problems)"
    )
    check.add_argument("library")
    which = check.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, metavar="N", help="the version to check (default: the current)")
    which.add_argument(
        "--repair",
        action="store_true",
        help="publish the current version without the parts with problems (a refresh embeds their videos "
        "again) and with its index built anew",
    )
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    _storage_flags(check)
    rollback = commands.add_parser("rollback", help="publish an earlier version again as the current one")
    rollback.add_argument("library")
    rollback.add_argument("--to", type=int, required=True, metavar="N", help="the version to publish again")
    rollback.add_argument("--json", action="store_true", help="print the new version as JSON")
    _storage_flags(rollback)

    versions = commands.add_parser("versions", help="list a library's versions: time, counts, model, changes")
    versions.add_argument("library")
    versions.add_argument("--json", action="store_true", help="print the versions as JSON")
    _storage_flags(versions)

    query = commands.add_parser("query", help="rank a library's videos by a text, or by an example video")
    query.add_argument("library")
    query.add_argument("text", nargs="?", help="what to look for, in words")
    query.add_argument(
        "--like",
        metavar="VIDEO",
        help="instead of a text: videos like this one (a file or URL, embedded whole as one clip, as the "
        "library's videos were)",
    )
    query.add_argument(
        "--queries",
        metavar="FILE",
        help="instead of a text: many texts, one a line, from a file (- for stdin), answered as they come "
        "by one opened library and model; with --json, a JSON object a line: {query, hits}",
    )
    query.add_argument("-k", type=int, default=10, help="results (default 10)")
    query.add_argument("--version", type=int, help="search this version (default: the current one)")
    query.add_argument(
        "--per-video",
        action="store_true",
        help="one result per video, its best segment, for the k best videos (default: the k best segments)",
    )
    query.add_argument(
        "--under",
        metavar="FOLDER",
        help="only the videos in this folder of the source (s3://bucket/videos/2024/, /data/videos/trip) or "
        "this one video",
    )
    query.add_argument("--json", action="store_true", help="print results as JSON")
    _storage_flags(query)

    serve = commands.add_parser("serve", help="serve a library over HTTP: a search API and a web page")
    serve.add_argument("library")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    serve.add_argument(
        "--api-key", help="require this key of API clients (else VIDEOSEARCH_API_KEY; default: none)"
    )
    serve.add_argument(
        "--poll",
        type=float,
        default=_default(ServiceOptions, "poll_s"),
        metavar="SECONDS",
        help="how often to look for a new version of the library (default %(default)s)",
    )
    _storage_flags(serve)

    classify = commands.add_parser(
        "classify",
        help="classify a video (or every video under a prefix): zero-shot, or by an EVL classifier",
    )
    classify.add_argument("source", help="a video, or a prefix/glob of videos")
    classify.add_argument(
        "--labels",
        help="kinetics400|kinetics600|ucf101|hmdb51|FILE (.txt, .csv with a name column, .json list or "
        '{"0": "abseiling", ...}); default: an EVL classifier\'s own class names, else kinetics400',
    )
    classify.add_argument("--model", help="checkpoint (default: the bundled model)")
    classify.add_argument(
        "--template", default=DEFAULT_TEMPLATE, type=_template, help="prompt template (default %(default)r)"
    )
    classify.add_argument("-k", type=int, default=5, help="labels shown per video (default 5)")
    classify.add_argument("--json", action="store_true")
    _storage_flags(classify)

    train = commands.add_parser(
        "train",
        help="train or fine-tune X-CLIP or EVL on captioned or labeled videos (Ray Train or in-process)",
    )
    train.add_argument("table", help="CSV or Parquet table with uri,caption or uri,label columns")
    train.add_argument("output", help="where checkpoint-<step>/ directories go (local path or URL)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--model", help="checkpoint to fine-tune (default: the bundled model)")
    start.add_argument(
        "--config",
        help="train from scratch: videosearch-tiny, a preset (xclip-base-patch32...) or a config.json",
    )
    start.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from one of its checkpoints")
    start.add_argument(
        "--family",
        choices=["evl"],
        help="evl: a new EVL decoder over a frozen CLIP backbone (a classifier on a uri,label table, "
        "text-aligned for search on a uri,caption table)",
    )
    train.add_argument(
        "--backbone",
        metavar="SRC",
        help="with --family evl: the CLIP or X-CLIP checkpoint whose frozen towers EVL uses (default: the "
        "bundled model)",
    )
    run = functools.partial(_default, TrainOptions)
    step = functools.partial(_default, TrainConfig)
    train.add_argument(
        "--epochs", type=int, default=run("epochs"), help="epochs in all (default %(default)s)"
    )
    train.add_argument(
        "--batch-size",
        type=int,
        default=run("batch_size"),
        help="clips per worker and step (default %(default)s)",
    )
    train.add_argument(
        "--lr", type=float, default=step("learning_rate"), help="peak learning rate (default %(default)s)"
    )
    train.add_argument(
        "--weight-decay",
        type=float,
        default=step("weight_decay"),
        help="AdamW weight decay (default %(default)s)",
    )
    train.add_argument(
        "--warmup-steps", type=int, default=step("warmup_steps"), help="linear warm-up, then cosine decay"
    )
    train.add_argument(
        "--freeze",
        default=step("freeze"),
        help="none, or towers: train only X-CLIP's own blocks (as for few-shot); default %(default)s",
    )
    train.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=step("precision"),
        help="auto (bf16 autocast on a GPU, else fp32), fp32 or bf16 (no faster than fp32 on CPUs, measured; "
        "3-26x slower on CPUs without AVX512-BF16 or AMX) (default %(default)s)",
    )
    train.add_argument(
        "--workers", type=int, default=run("workers"), help="data-parallel workers (default %(default)s)"
    )
    train.add_argument("--gpu", action="store_true", help="one GPU per worker")
    train.add_argument(
        "--cpus-per-worker", type=float, help="default: the most that lets every worker run at once"
    )
    train.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        type=_template,
        help="caption of a label (default %(default)r)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=run("seed"),
        help="initialization and shuffling seed (default %(default)s)",
    )
    train.add_argument(
        "--backbone-cache",
        choices=("auto", "on", "off"),
        default=run("backbone_cache"),
        help="a frozen backbone's features (EVL) computed once per clip and kept for every epoch: "
        "'auto' (the default) caches for 2+ epochs when they fit half the object store (in-process: half "
        "of 30%% of the memory)",
    )
    train.add_argument("--address", help="Ray address (default: start a local Ray)")
    train.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=run("executor"),
        help="where the run goes: on Ray Train, or in this process without Ray (one worker); auto (the "
        "default): in this process for one worker when no cluster is to be joined and the decoded clips "
        f"fill at most {IN_PROCESS_MAX_CLIP_BYTES / 2**30:g} GiB",
    )
    train.add_argument("--json", action="store_true", help="print the summary as JSON")
    _storage_flags(train)

    evaluate = commands.add_parser(
        "eval", help="recall@1/5/10 of captioned videos, or zero-shot accuracy of labeled ones"
    )
    evaluate.add_argument("library")
    evaluate.add_argument(
        "--captions",
        "--labels",
        dest="table",
        required=True,
        metavar="FILE",
        help="CSV or Parquet table of the library's videos: uri,caption (retrieval) or uri,label (accuracy)",
    )
    evaluate.add_argument(
        "--template", default=DEFAULT_TEMPLATE, type=_template, help="prompt of a label (default %(default)r)"
    )
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _storage_flags(evaluate)

    commands.add_parser("demo", help="embed generated sample videos with the bundled model, then query them")
    cluster_commands.add_commands(commands)
    return parser


def _config(name: str) -> XCLIPConfig:
    """``--config``: the tiny default geometry, a published preset, or a config.json file."""
    from xclip_core.config import XCLIPConfig
    from xclip_core.default_model import TINY, named_config

    if name != TINY and Path(name).is_file():
        return XCLIPConfig.from_json_file(name)
    try:
        return named_config(name)
    except KeyError as err:
        raise ValueError(f"{err.args[0]}; or videosearch-tiny, or the path of a config.json") from None


def _run_train(args: argparse.Namespace, out: TextIO) -> int:
    from .models import default_model_source
    from .train.job import train

    from_scratch = _config(args.config) if args.config else None
    options = TrainOptions(
        output=args.output,
        model=None
        if (from_scratch or args.resume or args.family)
        else (args.model or default_model_source()),
        config=from_scratch,
        resume=args.resume,
        family=args.family or "xclip",
        backbone=args.backbone,
        epochs=args.epochs,
        batch_size=args.batch_size,
        workers=args.workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        template=args.template,
        seed=args.seed,
        backbone_cache=args.backbone_cache,
        address=args.address,
        executor=args.executor,
        train=TrainConfig(
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            freeze=args.freeze,
            warmup_steps=args.warmup_steps,
            precision=args.precision,
        ),
        storage=_storage(args),
    )
    summary = train(args.table, options)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.text(), file=out)
    return 0


def _run_eval(args: argparse.Namespace, out: TextIO) -> int:
    from .search.evaluate import evaluate

    result = evaluate(args.library, args.table, _storage(args), args.template)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.text(), file=out)
    return 0


def _run_embed(args: argparse.Namespace, out: TextIO) -> int:
    from .embed import job

    options = EmbedOptions(
        model=args.model,
        frames=args.frames,
        segment_s=args.segment,
        sampling=args.sampling,
        decode_device=args.decode_device,
        batch_size=args.batch_size,
        compile=args.compile,
        precision=args.precision,
        decoders=args.decoders,
        encoders=args.encoders,
        gpus_per_encoder=args.gpus_per_encoder,
        address=args.address,
        executor=args.executor,
        stage_label=args.stage_label,
        retry_failed=args.retry_failed,
        allow_worse=args.allow_worse,
        storage=_storage(args),
    )
    summary = (job.refresh if args.command == "refresh" else job.embed)(args.source, args.library, options)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.text(), file=out)
    return 0 if summary.ok else 1


def _run_query(args: argparse.Namespace, out: TextIO) -> int:
    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    if [args.text, args.like, args.queries].count(None) != 2:
        raise ValueError("give one of a TEXT to look for, --like VIDEO or --queries FILE")
    texts = _query_lines(args.queries) if args.queries else None  # a missing file: before torch loads
    from .library.local_cache import LocalCache
    from .search import Searcher  # torch: after the arguments' checks

    under, like = (
        path if not path or "://" in path else os.path.abspath(path) for path in (args.under, args.like)
    )
    searcher = Searcher.open(args.library, _storage(args), args.version, LocalCache.from_env())
    narrowed = {"k": args.k, "per_video": args.per_video, "under": under}
    if texts is not None:
        for text in texts:
            _print_hits(searcher.search(text, **narrowed), args.json, out, text)
            out.flush()  # each answer as it comes (a pipe)
        return 0
    hits = searcher.like(like, **narrowed) if like else searcher.search(args.text, **narrowed)
    if not hits:  # on stderr: stdout stays the (empty) result
        library = searcher.library
        where = f" under {under}" if under else ""
        print(
            f"no results: {library.uri} version {library.version} holds no embedded video{where}",
            file=sys.stderr,
        )
    if hits and hits[0].scored_by == "cosine" and not args.json:
        why = "a video is the query" if like else "this model has no re-rank stage"
        print(f"scores: the embeddings' cosine ({why})", file=out)
    _print_hits(hits, args.json, out)
    return 0


def _query_lines(source: str) -> Iterator[str]:
    """The non-blank lines of ``source``, stripped: a local file's, or stdin's (``-``) as they come."""
    if source == "-":
        return (line.strip() for line in sys.stdin if line.strip())
    with open(source, encoding="utf-8") as f:
        return iter([line.strip() for line in f if line.strip()])


def _print_hits(hits: list[Any], as_json: bool, out: TextIO, query: str | None = None) -> None:
    """Hits as ``query`` prints them: a JSON list (one object a line, ``{query, hits}``, for one of many
    queries), or ranked lines (under the query, for one of many)."""
    if as_json:
        listed = [hit.to_dict() for hit in hits]
        text = json.dumps(listed, indent=2) if query is None else json.dumps({"query": query, "hits": listed})
        print(text, file=out)
        return
    if query is not None:
        print(query, file=out)
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:3d}. {hit.score:.4f}  {hit.uri}  [{hit.start_s:.1f}s-{hit.end_s:.1f}s]", file=out)
    if query is not None:
        print(file=out)


def _run_serve(args: argparse.Namespace, out: TextIO) -> int:
    from .library.local_cache import LocalCache
    from .search.service import serve

    options = ServiceOptions(
        api_key=args.api_key or os.environ.get("VIDEOSEARCH_API_KEY"),
        poll_s=args.poll,
        cache=LocalCache.from_env(default_folder=False),  # a folder named: a volume meant for it
    )
    serve(args.library, _storage(args), options, args.host, args.port)
    return 0


def _run_versions(args: argparse.Namespace, out: TextIO) -> int:
    from .library.history import history

    versions = history(args.library, _storage(args))
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=2), file=out)
    else:
        for version in versions:
            print(version.text(), file=out)
    return 0


def _run_rollback(args: argparse.Namespace, out: TextIO) -> int:
    from .library.history import rollback

    version = rollback(args.library, args.to, _storage(args))
    result = {"library": args.library, "version": version.number, "copy_of": args.to}
    text = f"library {args.library} version {version.number}: a copy of version {args.to}, now current"
    print(json.dumps(result, indent=2) if args.json else text, file=out)
    return 0


def _run_reindex(args: argparse.Namespace, out: TextIO) -> int:
    from .library.reindex import reindex

    version = reindex(args.library, args.kind, _storage(args))
    index = version.manifest["extra"]["reindexed"]
    result = {"library": args.library, "version": version.number, "index": index}
    text = f"library {args.library} version {version.number}: {index}, now current"
    print(json.dumps(result, indent=2) if args.json else text, file=out)
    return 0


def _run_check(args: argparse.Namespace, out: TextIO) -> int:
    from .library.check import check
    from .library.repair import repair

    checked = check(args.library, args.version, _storage(args))
    repaired = repair(args.library, checked, _storage(args)) if args.repair else None
    if args.json:
        result = {**checked.to_dict(), "repaired": repaired and repaired.to_dict()}
        print(json.dumps(result, indent=2), file=out)
    else:
        print(checked.text() + (f"\nrepaired: {repaired.text()}" if repaired else ""), file=out)
    return 0 if checked.ok else 1


def _run_gc(args: argparse.Namespace, out: TextIO) -> int:
    from .library.gc import collect
    from .storage import Store

    result = collect(Store(args.library, _storage(args)), args.keep, args.grace, args.dry_run)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.text(), file=out)
    return 0


def _run_classify(args: argparse.Namespace, out: TextIO) -> int:
    from .search.classify import classify_source

    results = classify_source(args.source, args.labels, args.model, args.template, args.k, _storage(args))
    if args.json:
        print(json.dumps(results, indent=2), file=out)
    else:
        for result in results:
            if result["error"]:
                print(f"{result['uri']}: failed: {result['error']}", file=out)
                continue
            print(result["uri"], file=out)
            for label, prob in result["labels"]:
                print(f"  {prob:6.3f}  {label}", file=out)
    return 0


def _run_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .samples.demo import run_demo

    run_demo(out=out)
    return 0


def _check_job(job: str, job_args: list[str]) -> None:
    """A submitted job's arguments as the job will parse them, checked before they travel: a mistake fails
    here at once (argparse's usage line, exit 2), not on the cluster. A relative local path is refused: the
    job would resolve it in its own working directory on the cluster."""
    parsed = _parser().parse_args([job, *job_args])
    paths = ("source", "library", "table", "output")  # always paths or URLs
    for name in (*paths, "model", "resume", "backbone", "config"):
        value = getattr(parsed, name, None)
        relative = isinstance(value, str) and "://" not in value and not os.path.isabs(value)
        # a path argument, or a model source that names a file or folder here (not a bundled model's name)
        if relative and (name in paths or os.path.exists(value)):
            raise ValueError(
                f"{value} is a relative path, which the job would look for in its own working directory on "
                "the cluster: give a URL (s3://...) or an absolute path that every node sees"
            )


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


# what an interrupted command leaves, by command (the others leave nothing to say)
_KEPT = "; nothing was published, and the parts written so far are kept: the same command goes on from them"
_INTERRUPTED = {
    "embed": _KEPT,
    "refresh": _KEPT,
    "train": "; the checkpoint of each finished epoch is kept: --resume the last one goes on from it",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    run = {
        "embed": _run_embed,
        "refresh": _run_embed,
        "versions": _run_versions,
        "gc": _run_gc,
        "check": _run_check,
        "rollback": _run_rollback,
        "reindex": _run_reindex,
        "query": _run_query,
        "serve": _run_serve,
        "classify": _run_classify,
        "train": _run_train,
        "eval": _run_eval,
        "demo": _run_demo,
        "submit": functools.partial(cluster_commands.run_submit, check=_check_job),
        "jobs": cluster_commands.run_jobs,
    }[args.command]
    out, ray_was_running = sys.stdout, _ray_running()
    try:
        # Ray forwards its workers' and raylet's log lines to stdout: they go to stderr, so that stdout holds
        # the command's result alone (a --json result stays parseable)
        with contextlib.redirect_stdout(sys.stderr):
            try:
                return run(args, out)
            finally:
                if _ray_running() and not ray_was_running:  # the Ray this command started: its forwarding
                    sys.modules["ray"].shutdown()  # stops now, not after the result
    except WorseVersionError as err:  # the job ran, its result was not published
        print(f"videosearch {args.command}: not published: {err}", file=sys.stderr)
        return 1
    except (StorageError, LibraryError, ValueError, FileNotFoundError, ClusterError) as err:
        print(f"videosearch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = _INTERRUPTED.get(args.command, "")
        print(f"videosearch {args.command}: interrupted{kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
