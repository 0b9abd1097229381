"""The embed job's encode stage in bfloat16 against float32: its rate, and what bf16 changes in the
embeddings and in retrieval.

Usage: python bench/precision.py [--videos 24] [--model DIR] [--batch 4] [--rounds 3] [--device cpu|cuda]
                                 [--workdir DIR] [--seconds 10] [--width 640 --height 360] [--fps 25]
                                 [--gop 50]

Decodes ``--videos`` captioned synthetic clips (``bench/decode.py``'s, cached in the same workdir) with
exact sampling, then encodes them with ``EncodeFrames`` (the job's encode stage, on the CPUs with torch's
default thread count or on the GPU, ``--batch`` videos per call) at ``--precision fp32`` and ``bf16``, in
alternating rounds so that the machine's drifts in speed fall on both alike. Printed: each precision's best
and median videos/s and their ratio, the GPU's name or whether the CPU has native bfloat16 instructions
(AVX512-BF16, AMX), and what bf16 does to retrieval (``bench/retrieval.py``: every caption as a query against
every clip, text embeddings in float32 as ``query`` computes them; the mean Spearman correlation of the two
rankings, recall@1 of each, the mean cosine of a video's two embeddings). Retrieval figures mean something
for a trained model: ``--model`` defaults to the bundled one, which knows the synthetic world; a random
checkpoint (``bench/pipeline.py`` writes base-patch32's under its workdir) gives the rate and the cosine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode import cached_clips, clip_flags  # noqa: E402  (bench/, this script's directory)
from retrieval import agreement  # noqa: E402

from pipeline.bf16 import cpu_bf16_instructions  # noqa: E402
from pipeline.embed.stages.decode import DecodeSettings, decode_video  # noqa: E402
from pipeline.embed.stages.encode import EncodeFrames  # noqa: E402
from pipeline.models import load_model  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def native_bf16() -> str:
    """The CPU's bfloat16 instructions, from Linux's /proc/cpuinfo."""
    found = cpu_bf16_instructions()
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")  # e.g. AVX512_CORE: oneDNN uses none of them
    limited = f" (oneDNN limited to {limit} by ONEDNN_MAX_CPU_ISA)" if limit else ""
    if found is None:
        return f"unknown (no /proc/cpuinfo){limited}"
    return (", ".join(found) if found else "none (emulated)") + limited


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    clip_flags(parser)
    parser.add_argument("--batch", type=int, default=4, help="videos per encoder call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the stage encodes")
    args = parser.parse_args()
    clips = cached_clips(args)
    model = load_model(args.model).eval()
    settings = DecodeSettings(model.num_frames, model.preprocessor)
    rows = [decode_video(path, settings)[0] for path, _ in clips]
    batch = {
        "uri": np.array([str(path) for path, _ in clips], dtype=object),
        "error": np.array([None] * len(rows), dtype=object),
        "frames": np.stack([row["frames"] for row in rows]),
    }
    stages = {
        precision: EncodeFrames(args.model, device=args.device, batch_size=args.batch, precision=precision)
        for precision in PRECISIONS
    }
    embeddings = {p: stage(batch)["embedding"] for p, stage in stages.items()}  # also the warm-up
    rates: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(args.rounds):
        for precision, stage in stages.items():
            started = time.perf_counter()
            stage(batch)
            rates[precision].append(len(rows) / (time.perf_counter() - started))

    machine = (
        f"{torch.cuda.get_device_name()}"
        if args.device == "cuda"
        else f"{torch.get_num_threads()} torch threads; the CPU's bfloat16 instructions: {native_bf16()}"
    )
    print(
        f"{len(rows)} clips, {model.identity.source}: {model.num_frames} frames at "
        f"{model.preprocessor.crop_size}, batch {args.batch}, {args.rounds} alternating rounds; {machine}"
    )
    for precision in PRECISIONS:
        print(
            f"  {precision}  best {max(rates[precision]):8.2f} videos/s, median "
            f"{statistics.median(rates[precision]):8.2f}"
        )
    print(
        f"  ratio bf16 / fp32: best {max(rates['bf16']) / max(rates['fp32']):.2f}x, median "
        f"{statistics.median(rates['bf16']) / statistics.median(rates['fp32']):.2f}x"
    )
    with torch.inference_mode():
        texts = model.encode_texts([caption for _, caption in clips])
    measured = agreement(texts, *(torch.from_numpy(embeddings[p]) for p in PRECISIONS))
    print(f"retrieval ({len(clips)} caption queries): {measured.text('fp32', 'bf16')}")


if __name__ == "__main__":
    main()
