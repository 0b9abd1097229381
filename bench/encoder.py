"""Our X-CLIP video encoder against ``transformers.XCLIPModel``: same weights, same inputs, one run.

Usage: python bench/encoder.py [--preset xclip-base-patch32] [--batch 4] [--rounds 5]
                               [--dtype float32|bfloat16|float16] [--device cpu|cuda] [--compile]

Random weights are saved once in the Hugging Face layout and both implementations load them. Throughput is
timed in alternating rounds in one process (reference, ours, reference, ours...), so that load from other
processes hits both alike; each implementation's best and median round are reported. Peak memory is measured
separately, each implementation in its own subprocess (load + one batch). Also prints the max abs difference
of the embeddings, and a roofline: each implementation's floating-point operations per batch (torch's
FlopCounterMode: matrix multiplies, convolution, attention), the GFLOP/s it reaches, and this machine's
rate on the model's largest matrix multiply, timed in the same run, which bounds what any implementation of
the same arithmetic can reach. ``--compile`` adds ours through ``torch.compile`` as the embed job's
``--compile on`` runs it (CUDA graphs on a GPU), with the seconds its first call took to compile.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load_encoder(impl: str, checkpoint: str, dtype: torch.dtype, device: str) -> Callable:
    """``pixel_values -> video embeddings`` for one implementation."""
    if impl in ("ours", "compiled"):
        from pipeline.embed.stages.encode import compiled_encoder
        from xclip_core import XCLIPModel

        model = XCLIPModel.from_pretrained(checkpoint, dtype=dtype, device=device)
        if impl == "compiled":
            return compiled_encoder(model.get_video_features, torch.device(device))
        return model.get_video_features
    from transformers import XCLIPModel as ReferenceModel

    reference = ReferenceModel.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    return lambda x: reference.get_video_features(pixel_values=x).pooler_output


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_flops(encode: Callable, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        encode(x)
    return counter.get_total_flops()


def matmul_gflops(rows: int, width: int, hidden: int, dtype: torch.dtype, device: str, rounds: int) -> float:
    """Best GFLOP/s of one ``(rows, width) x (width, hidden)`` linear layer (the MLP's first) here."""
    x = torch.randn(rows, width, dtype=dtype, device=device)
    weight = torch.randn(hidden, width, dtype=dtype, device=device)
    bias = torch.randn(hidden, dtype=dtype, device=device)
    F.linear(x, weight, bias)
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        F.linear(x, weight, bias)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * width * hidden / best / 1e9


def peak_memory(impl: str, work: str, args: argparse.Namespace) -> dict:
    """Child process: load one implementation, encode one batch, report its peak memory."""
    dtype = getattr(torch, args.dtype)
    encode = load_encoder(impl, f"{work}/ckpt", dtype, args.device)
    with torch.inference_mode():
        encode(torch.load(f"{work}/inputs.pt", weights_only=True).to(args.device, dtype))
    sync(args.device)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_gpu_mib": gpu}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", default="xclip-base-patch32", help="a published geometry, or videosearch-tiny"
    )
    parser.add_argument("--batch", type=int, default=4, help="videos per forward pass")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per implementation")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time ours through torch.compile")
    parser.add_argument("--memory-child", nargs=2, metavar=("IMPL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(peak_memory(*args.memory_child, args)))
        return

    from transformers import XCLIPConfig as ReferenceConfig
    from transformers import XCLIPModel as ReferenceModel
    from transformers.utils import logging as hf_logging

    from xclip_core.default_model import named_config

    hf_logging.disable_progress_bar()
    config = named_config(args.preset)
    vision = config.vision_config
    dtype = getattr(torch, args.dtype)
    impls = ("reference", "ours")
    with tempfile.TemporaryDirectory() as work:
        torch.manual_seed(0)
        ReferenceModel(ReferenceConfig(**config.to_dict())).save_pretrained(f"{work}/ckpt")
        pixel_values = (
            torch.rand(args.batch, vision.num_frames, 3, vision.image_size, vision.image_size) * 4 - 2
        )
        torch.save(pixel_values, f"{work}/inputs.pt")
        memory = {}
        for impl in impls:
            cmd = [sys.executable, __file__, "--memory-child", impl, work, *sys.argv[1:]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            memory[impl] = json.loads(out.strip().splitlines()[-1])
        if args.compile:
            impls += ("compiled",)
        encoders = {impl: load_encoder(impl, f"{work}/ckpt", dtype, args.device) for impl in impls}

    x = pixel_values.to(args.device, dtype)
    seconds: dict[str, list[float]] = {impl: [] for impl in impls}
    with torch.inference_mode():
        outputs, first_call = {}, {}
        for impl in impls:  # warm-up (and the compile)
            started = time.perf_counter()
            outputs[impl] = encoders[impl](x).float().cpu()
            first_call[impl] = time.perf_counter() - started
        flops = {impl: count_flops(encoders[impl if impl != "compiled" else "ours"], x) for impl in impls}
        rows = args.batch * vision.num_frames * (vision.num_patches + 1)  # the MLP sees patches + class
        peak = matmul_gflops(rows, vision.hidden_size, vision.intermediate_size, dtype, args.device, 5)
        for _ in range(args.rounds):
            for impl in impls:
                sync(args.device)
                start = time.perf_counter()
                encoders[impl](x)
                sync(args.device)
                seconds[impl].append(time.perf_counter() - start)

    print(
        f"preset {args.preset}: {vision.num_frames} frames, batch {args.batch}, {args.dtype}, {args.device}, "
        f"{torch.get_num_threads()} threads, {args.rounds} alternating rounds"
    )
    rate = {
        impl: {"best": args.batch / min(s), "median": args.batch / statistics.median(s)}
        for impl, s in seconds.items()
    }
    for impl, label in (("reference", "reference (transformers)"), ("ours", "ours (xclip_core)")):
        mem = memory[impl]
        gpu = f", peak GPU {mem['peak_gpu_mib']:.0f} MiB" if mem["peak_gpu_mib"] is not None else ""
        print(
            f"  {label:26s} best {rate[impl]['best']:7.2f} videos/s, median {rate[impl]['median']:7.2f}, "
            f"peak RSS {mem['peak_rss_mib']:.0f} MiB{gpu}"
        )
    if args.compile:
        print(
            f"  {'ours, compiled':26s} best {rate['compiled']['best']:7.2f} videos/s, median "
            f"{rate['compiled']['median']:7.2f}, first call (the compile) {first_call['compiled']:.1f} s"
        )
    for stat in ("best", "median"):
        print(f"  ratio ours / reference ({stat}): {rate['ours'][stat] / rate['reference'][stat]:.2f}x")
        if args.compile:
            print(f"  ratio compiled / ours ({stat}): {rate['compiled'][stat] / rate['ours'][stat]:.2f}x")
    diff = (outputs["ours"] - outputs["reference"]).abs().max().item()
    print(f"  max abs difference of video embeddings: {diff:.2e}")
    if args.compile:
        diff = (outputs["compiled"] - outputs["ours"]).abs().max().item()
        print(f"  max abs difference, compiled vs ours: {diff:.2e}")
    print(
        f"roofline: this machine's {rows}x{vision.hidden_size} by {vision.hidden_size}x"
        f"{vision.intermediate_size} matrix multiply runs at {peak:.1f} GFLOP/s"
    )
    for impl in impls:
        reached = flops[impl] / min(seconds[impl]) / 1e9
        print(
            f"  {impl:9s} {flops[impl] / args.batch / 1e9:6.1f} GFLOP per video, {reached:6.1f} GFLOP/s "
            f"({reached / peak:.0%} of that rate)"
        )
    ceiling = min(seconds["reference"]) / (flops["ours"] / (peak * 1e9))
    print(f"  ours / reference if all of our arithmetic ran at that rate: {ceiling:.2f}x")


if __name__ == "__main__":
    main()
