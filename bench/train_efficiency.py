"""One EVL training step (frozen backbone, 4-layer decoder) against one step of full X-CLIP fine-tuning.

Usage: python bench/train_efficiency.py [--geometry b16|b32|tiny] [--batch 2] [--frames 8] [--steps 3]
                                        [--warmup 1] [--device cpu|cuda] [--dtype fp32|bf16]

Both models have the same backbone geometry (width, layers, heads, patch, image size), the same frame count
and the same batch, with random weights (nothing is downloaded):

- X-CLIP: ``XCLIPModel`` of the geometry's preset, stepped by ``pipeline.train.trainer.Trainer`` with
  ``TrainConfig(freeze="none")`` (AdamW over every parameter, X-CLIP's contrastive loss on a few random
  captions), as users run full fine-tuning.
- EVL: ``EVLModel`` on the same CLIP ViT (frozen, run under no_grad), a decoder over its last 4 layers and a
  400-class head, stepped by the same ``Trainer`` (AdamW over the decoder and head, cross-entropy on random
  labels), as ``videosearch train --family evl`` runs it.
- EVL, backbone cached: the same EVL step from the batch's backbone features, computed beforehand and kept
  in bfloat16 as the train job's backbone cache keeps them (``pipeline.train.backbone_cache``: the job's
  default for runs of 2+ epochs), i.e. every step of a run once the backbone has seen each clip. A whole run
  is reported too: this step plus the backbone's forward spread over 2, 5 and 10 epochs.

``--geometry``: ``b16`` ViT-B/16 at 224 px (``xclip-base-patch16``, ``k400_vitb16_8f_dec4x768``; the default),
``b32`` ViT-B/32 at 224 px (``xclip-base-patch32``), ``tiny`` the bundled model's 128-wide 96 px geometry (a
smoke test). Pixel values are random uint8 frames, normalized with CLIP's mean and deviation.

Memory: each model in its own fresh subprocess (so that peaks do not mix) builds the model, optimizer and
batch, then runs ``--warmup`` + 1 steps (the first allocates AdamW's state). Time: both models in this
process, ``--warmup`` untimed steps each, then ``--steps`` timed steps in alternating rounds (X-CLIP, EVL,
X-CLIP, EVL...), so that load from other processes hits both alike. With ``--dtype bf16`` both steps run
under ``torch.autocast`` in bfloat16 (weights and optimizer in float32, as the product's trainer does on
CUDA). Prints, per model:

  s/step, steps/s    median and best of the timed steps (steps/s from the median)
  GFLOP/step         one step's floating-point operations (torch's FlopCounterMode: matrix multiplies,
                     convolutions, attention; forward, backward and optimizer), a load-free expectation
  step peak          the training step's own peak memory: on CPU the peak RSS during the steps minus the RSS
                     before the first step, i.e. after building the model, optimizer and batch (the RSS
                     high-water mark is reset there, so that a peak while building cannot hide the step's);
                     on CUDA torch.cuda.max_memory_allocated minus the memory allocated then
  process peak       the whole process's peak: ru_maxrss (CPU), max_memory_allocated (CUDA)
  parameters         all / trainable

and the ratios, measured in this run: EVL / X-CLIP steps/s (goal >= 3x; uncached and cached) and EVL / X-CLIP
step peak (goal <= 1/3; the goal ratio uses the step's own peak, since the weights are the same order in
both), each with "met" or "missed", plus the whole-process peaks' ratio for reference, and the FLOP bound:
X-CLIP's step over EVL's backbone forward alone, the most EVL can gain at an equal arithmetic rate. Last,
``--steps`` more EVL steps timed in parts (median of each): backbone forward (no grad), decoder and head
forward, backward, AdamW step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: --geometry -> the X-CLIP geometry (a name for ``xclip_core.default_model.named_config``)
GEOMETRIES = {"b16": "xclip-base-patch16", "b32": "xclip-base-patch32", "tiny": "videosearch-tiny"}
DECODER_LAYERS = 4
CAPTIONS = [
    "a person slicing vegetables in a kitchen",
    "two dogs chasing a ball across a lawn",
    "a cyclist riding down a mountain trail",
    "waves breaking on a rocky beach at sunset",
    "a child stacking wooden blocks on a table",
    "a crowd cheering at a football match",
]
LABELS = {
    "xclip": "X-CLIP full fine-tuning",
    "evl": "EVL (frozen backbone)",
    "evl-cached": "EVL, backbone cached",
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def configs(args: argparse.Namespace):
    """The X-CLIP and EVL configs of ``--geometry``: the same ViT, frame count; EVL's decoder on top."""
    from dataclasses import replace

    from xclip_core.default_model import named_config
    from xclip_core.evl import EVLConfig, EVLDecoderConfig, EVLVisionConfig

    xclip = named_config(GEOMETRIES[args.geometry])
    if args.frames:
        xclip.vision_config = replace(xclip.vision_config, num_frames=args.frames)
    v = xclip.vision_config
    heads = max(1, v.hidden_size // 64)  # EVL's decoder: heads of 64 channels, as the release's presets
    evl = EVLConfig(
        vision_config=EVLVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            num_channels=v.num_channels,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act=v.hidden_act,
            layer_norm_eps=v.layer_norm_eps,
        ),
        decoder_config=EVLDecoderConfig(
            num_layers=min(DECODER_LAYERS, v.num_hidden_layers),
            attention_dim=v.hidden_size,
            num_attention_heads=heads,
            intermediate_size=4 * v.hidden_size,
        ),
        num_frames=v.num_frames,
    )
    return xclip, evl


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    """The current resident set size of this process."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0: ``clear_refs`` 5), so that
    a peak reached while building the model does not hide the step's. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def random_videos(
    args: argparse.Namespace, image_size: int, frames: int, device: torch.device
) -> torch.Tensor:
    """(B, T, 3, H, W): random uint8 frames, scaled to [0, 1], normalized with CLIP's mean and deviation."""
    frames_u8 = torch.randint(0, 256, (args.batch, frames, 3, image_size, image_size), dtype=torch.uint8)
    mean = torch.tensor(CLIP_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 1, 3, 1, 1)
    return ((frames_u8.float() / 255 - mean) / std).to(device)


def autocast(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    if args.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build(model_name: str, args: argparse.Namespace, device: torch.device):
    """The model's one training step as a function of nothing, and its (all, trainable) parameter counts."""
    xclip_config, evl_config = configs(args)
    torch.manual_seed(0)
    if model_name == "xclip":
        from pipeline.train.config import TrainConfig
        from pipeline.train.trainer import Trainer
        from xclip_core.model import XCLIPModel

        model = XCLIPModel(xclip_config).to(device)
        trainer = Trainer(model, config=TrainConfig(freeze="none", precision=args.dtype))
        vision = xclip_config.vision_config
        pixel_values = random_videos(args, vision.image_size, vision.num_frames, device)
        captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]

        def step() -> float:
            return trainer.step(pixel_values, captions)

    else:
        from pipeline.train.config import TrainConfig
        from pipeline.train.trainer import Trainer
        from xclip_core.evl import EVLModel

        evl_config.labels = [f"class {i}" for i in range(evl_config.num_classes)]
        model = EVLModel(evl_config).to(device)
        trainer = Trainer(model, config=TrainConfig(precision=args.dtype))
        optimizer = trainer.optimizer
        vision = evl_config.vision_config
        pixel_values = random_videos(args, vision.image_size, evl_config.num_frames, device)
        labels = torch.randint(0, evl_config.num_classes, (args.batch,), device=device)
        names = [evl_config.labels[i] for i in labels.tolist()]

        if model_name == "evl-cached":  # the backbone cache's features, as the train job stores them
            from pipeline.train.backbone_cache import from_stored, to_stored

            features = from_stored(to_stored(model.eval().backbone_features(pixel_values))).to(device)

            def step() -> float:
                return trainer.step(None, names, backbone_features=features)

        else:

            def step() -> float:
                return trainer.step(pixel_values, names)

        def parts() -> dict[str, float]:
            return evl_parts(model, optimizer, pixel_values, labels, args, device)

        @torch.no_grad()
        def backbone_forward() -> None:
            with autocast(args, device):
                model.vision_model(pixel_values.flatten(0, 1), evl_config.decoder_config.num_layers)

        step.parts = parts  # type: ignore[attr-defined]
        step.backbone_forward = backbone_forward  # type: ignore[attr-defined]

    counts = (
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    return step, counts


def evl_parts(model, optimizer, pixel_values, labels, args, device) -> dict[str, float]:
    """Seconds of one EVL step's parts: backbone forward, decoder + head forward, backward, optimizer."""
    seconds: dict[str, float] = {}
    config = model.config

    def lap(name: str, start: float) -> float:
        sync(device)
        now = time.perf_counter()
        seconds[name] = now - start
        return now

    model.train()
    sync(device)
    start = time.perf_counter()
    with autocast(args, device):
        with torch.no_grad():
            features = model.vision_model(pixel_values.flatten(0, 1), config.decoder_config.num_layers)
        start = lap("backbone forward (no grad)", start)
        logits = model.head(model.decoder(features, pixel_values.shape[1]))
        loss = F.cross_entropy(logits, labels)
    start = lap("decoder + head forward", start)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    start = lap("backward (decoder + head)", start)
    optimizer.step()
    lap("AdamW step", start)
    return seconds


def memory_child(model_name: str, args: argparse.Namespace) -> dict:
    """In a fresh process: build one model, run ``--warmup`` + 1 steps, report its peak memory."""
    device = torch.device(args.device)
    step, _ = build(model_name, args, device)
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    build_peak = max_rss_bytes()
    reset = reset_peak_rss()
    rss_before = rss_bytes()
    for _ in range(args.warmup + 1):  # the first step allocates AdamW's state, the next has it all along
        step()
    sync(device)
    after_steps = max_rss_bytes()
    return {
        "rss_before": rss_before,
        "step_peak": (torch.cuda.max_memory_allocated(device) - before) if cuda else after_steps - rss_before,
        "process_peak": torch.cuda.max_memory_allocated(device) if cuda else max(build_peak, after_steps),
        "host_process_peak": max(build_peak, after_steps),
        "high_water_reset": reset,
    }


def count_flops(work) -> int:
    """Floating-point operations of ``work()`` (a training step: forward, backward, AdamW) as torch's
    FlopCounterMode counts them: matrix multiplies, convolutions, attention; not element-wise work, gathers
    or scatters."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--geometry", default="b16", choices=sorted(GEOMETRIES), help="backbone geometry")
    parser.add_argument("--batch", type=int, default=2, help="videos per step (at least 2: X-CLIP's loss)")
    parser.add_argument(
        "--frames", type=int, default=None, help="frames per video (default: the preset's, 8)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: torch.autocast")
    parser.add_argument("--memory-child", choices=list(LABELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch < 2:
        parser.error("--batch must be at least 2 (X-CLIP's contrastive loss needs two videos)")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return

    xclip_config, evl_config = configs(args)
    v = xclip_config.vision_config
    print(
        f"geometry {args.geometry}: ViT width {v.hidden_size}, {v.num_hidden_layers} layers, patch "
        f"{v.patch_size}, {v.image_size} px; {v.num_frames} frames, batch {args.batch}; EVL decoder "
        f"{evl_config.decoder_config.num_layers} x {evl_config.vision_config.hidden_size}; {args.device}, "
        f"{args.dtype}, {torch.get_num_threads()} threads; {args.warmup} warm-up + {args.steps} timed steps "
        "per model in alternating rounds",
        flush=True,
    )
    if args.device == "cpu" and args.dtype == "bf16":
        from precision import native_bf16  # bench/, this script's directory

        print(f"  the CPU's bfloat16 instructions: {native_bf16()}", flush=True)
    names, labels = tuple(LABELS), LABELS
    memory = {}
    for name in names:  # first, while this process is small (a child's ru_maxrss starts at its parent's RSS)
        cmd = [sys.executable, __file__, "--memory-child", name, *sys.argv[1:]]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the {name} child exited with {done.returncode}:\n{done.stderr[-3000:]}")
        memory[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  memory: {name} process done in {time.perf_counter() - started:.0f} s", flush=True)

    device = torch.device(args.device)
    steps, counts = {}, {}
    for name in names:
        steps[name], counts[name] = build(name, args, device)
    for _ in range(args.warmup):
        for name in names:
            steps[name]()
    sync(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.steps):  # alternating, so that load from other processes hits both alike
        for name in names:
            start = time.perf_counter()
            steps[name]()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    laps = [steps["evl"].parts() for _ in range(args.steps)]
    parts = {what: statistics.median(lap[what] for lap in laps) for what in laps[0]}
    flops = {name: count_flops(steps[name]) for name in names}
    backbone_flops = count_flops(steps["evl"].backbone_forward)

    rate = {name: 1 / statistics.median(s) for name, s in seconds.items()}
    kind = "GPU memory" if device.type == "cuda" else "RSS"
    print(
        f"\n  {'':24s} {'s/step median':>13s} {'best':>7s} {'steps/s':>8s} {'GFLOP/step':>10s} "
        f"{'step peak':>10s} {'process peak':>12s} {'params (trainable)':>19s}"
    )
    for name in names:
        s, mem, (params, trainable) = seconds[name], memory[name], counts[name]
        print(
            f"  {labels[name]:24s} {statistics.median(s):13.2f} {min(s):7.2f} {rate[name]:8.3f} "
            f"{flops[name] / 1e9:10.1f} {mib(mem['step_peak']):>10s} {mib(mem['process_peak']):>12s} "
            f"{params / 1e6:8.1f} M ({trainable / 1e6:.1f} M)"
        )
    speed = rate["evl"] / rate["xclip"]
    best = min(seconds["xclip"]) / min(seconds["evl"])
    step_mem = memory["evl"]["step_peak"] / memory["xclip"]["step_peak"]
    process_mem = memory["evl"]["process_peak"] / memory["xclip"]["process_peak"]
    print(
        f"\n  ratio EVL / X-CLIP steps/s: {speed:.2f}x from the medians, {best:.2f}x from the best steps "
        f"(goal >= 3x: {verdict(speed >= 3)})"
    )
    print(
        f"  FLOP per step X-CLIP / EVL: {flops['xclip'] / flops['evl']:.2f}x. EVL's step contains the frozen "
        f"backbone's forward, {backbone_flops / 1e9:.1f} GFLOP ({backbone_flops / flops['evl']:.0%} of its "
        f"step): X-CLIP's step / that = {flops['xclip'] / backbone_flops:.2f}x, the most EVL can gain at an "
        "equal arithmetic rate even with a free decoder"
    )
    print(
        f"  ratio EVL / X-CLIP step peak {kind}: {step_mem:.3f} = 1/{1 / step_mem:.1f} (goal <= 1/3: "
        f"{verdict(step_mem <= 1 / 3)}). The goal ratio uses the step's own peak: the increase over the "
        "process after building model, optimizer and batch (AdamW's state and the gradients included)"
    )
    print(f"  ratio EVL / X-CLIP whole-process peak {kind}: {process_mem:.3f} (for reference)")
    cached = rate["evl-cached"] / rate["xclip"]
    cached_mem = memory["evl-cached"]["step_peak"] / memory["xclip"]["step_peak"]
    print(
        f"  with the backbone cache (the train job's default for 2+ epochs), every step after the backbone's "
        f"one pass per clip: {cached:.2f}x X-CLIP's steps/s (goal >= 3x: {verdict(cached >= 3)}), step peak "
        f"1/{1 / cached_mem:.1f}"
    )
    backbone_s, cached_s = parts["backbone forward (no grad)"], statistics.median(seconds["evl-cached"])
    runs = ", ".join(
        f"{epochs} epochs {statistics.median(seconds['xclip']) / (cached_s + backbone_s / epochs):.2f}x"
        for epochs in (2, 5, 10)
    )
    print(f"  a whole run with the cache, the backbone's one pass per clip spread over its epochs: {runs}")
    if device.type == "cuda":
        host = memory["evl"]["host_process_peak"] / memory["xclip"]["host_process_peak"]
        print(
            f"  host peak RSS: X-CLIP {mib(memory['xclip']['host_process_peak'])}, EVL "
            f"{mib(memory['evl']['host_process_peak'])} ({host:.2f})"
        )
    elif not all(m["high_water_reset"] for m in memory.values()):
        print("  note: could not reset the RSS high-water mark: a build peak above the step's counts as its")
    total = sum(parts.values())
    print(f"\n  EVL step in parts, {args.steps} more steps, median of each part (sum {total:.2f} s):")
    for what, t in parts.items():
        print(f"    {what:28s} {t:7.3f} s  {t / total:5.1%}")


if __name__ == "__main__":
    main()
