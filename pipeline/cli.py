"""``videosearch``: argument parsing only; every command calls the library code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .storage import StorageError, StorageOptions


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("object storage (default: the standard AWS environment and config)")
    group.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    group.add_argument("--profile", help="credentials profile (else AWS_PROFILE)")
    group.add_argument("--region", help="region (else AWS_REGION / AWS_DEFAULT_REGION)")
    group.add_argument("--anon", action="store_true", help="anonymous access to public buckets")


def _storage(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions.from_env_and_flags(
        endpoint_url=args.endpoint_url, profile=args.profile, anon=args.anon, region=args.region
    )


def _default_model() -> str:
    from xclip_core.default_model import default_model_dir

    return default_model_dir()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="videosearch", description="Embed videos with X-CLIP on Ray and search them by text."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="build a searchable library from videos on any fsspec storage")
    embed.add_argument(
        "source", help="prefix or glob of videos: /data/videos/, s3://bucket/prefix/, 'gs://b/*.mp4'"
    )
    embed.add_argument("library", help="where the library is written: a local path or s3://bucket/library")
    embed.add_argument("--model", help="X-CLIP checkpoint directory or URL (default: the bundled model)")
    embed.add_argument("--frames", type=int, help="frames per video or segment (default: the model's)")
    embed.add_argument("--segment", type=float, metavar="SECONDS", help="embed segments of this length")
    embed.add_argument("--batch-size", type=int, default=4, help="videos per encoder call (default 4)")
    embed.add_argument("--decoders", type=int, help="decode actors (default: from the cluster's CPUs)")
    embed.add_argument("--encoders", type=int, help="encode actors (default: one per GPU, else 1)")
    embed.add_argument("--gpus-per-encoder", type=float, help="GPUs per encode actor (default 1 if any)")
    embed.add_argument("--address", help="Ray address (default: start a local Ray)")
    embed.add_argument("--json", action="store_true", help="print the summary as JSON")
    _storage_flags(embed)

    query = commands.add_parser("query", help="rank a library's videos by a text")
    query.add_argument("library")
    query.add_argument("text")
    query.add_argument("-k", type=int, default=10, help="results (default 10)")
    query.add_argument("--json", action="store_true", help="print results as JSON")
    _storage_flags(query)

    classify = commands.add_parser(
        "classify", help="zero-shot classify a video (or every video under a prefix)"
    )
    classify.add_argument("source", help="a video, or a prefix/glob of videos")
    classify.add_argument(
        "--labels", default="kinetics400", help="kinetics400|kinetics600|ucf101|hmdb51|FILE"
    )
    classify.add_argument("--model", help="X-CLIP checkpoint (default: the bundled model)")
    classify.add_argument(
        "--template", default="a video of {}", help="prompt template (default 'a video of {}')"
    )
    classify.add_argument("-k", type=int, default=5, help="labels shown per video (default 5)")
    classify.add_argument("--json", action="store_true")
    _storage_flags(classify)

    commands.add_parser("demo", help="embed generated sample videos with the bundled model, then query them")
    return parser


def _run_embed(args: argparse.Namespace) -> int:
    from .plan import EmbedOptions, embed

    options = EmbedOptions(
        model=args.model or _default_model(),
        frames=args.frames,
        segment_s=args.segment,
        batch_size=args.batch_size,
        decoders=args.decoders,
        encoders=args.encoders,
        gpus_per_encoder=args.gpus_per_encoder,
        address=args.address,
        storage=_storage(args),
    )
    summary = embed(args.source, args.library, options)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.text())
    return 0 if summary.ok else 1


def _run_query(args: argparse.Namespace) -> int:
    from .library import Library

    hits = Library.open(args.library, _storage(args)).search(args.text, k=args.k)
    if args.json:
        print(json.dumps([hit.to_dict() for hit in hits], indent=2))
    else:
        for rank, hit in enumerate(hits, 1):
            print(f"{rank:3d}. {hit.score:.4f}  {hit.uri}  [{hit.start_s:.1f}s-{hit.end_s:.1f}s]")
    return 0


def _run_classify(args: argparse.Namespace) -> int:
    from .zero_shot import classify_source

    results = classify_source(
        args.source, args.labels, args.model or _default_model(), args.template, args.k, _storage(args)
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if result["error"]:
                print(f"{result['uri']}: failed: {result['error']}")
                continue
            print(result["uri"])
            for label, prob in result["labels"]:
                print(f"  {prob:6.3f}  {label}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    run = {"embed": _run_embed, "query": _run_query, "classify": _run_classify, "demo": _run_demo}[
        args.command
    ]
    try:
        return run(args)
    except (StorageError, ValueError, FileNotFoundError) as err:
        print(f"videosearch {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
