"""Loading a checkpoint with its weights hash (what every job, query and encoder actor does first) against a
plain load followed by the hash, and against the hash alone, its floor.

Usage: python bench/model_load.py [--preset xclip-base-patch32|videosearch-tiny] [--rounds 5] [--workdir DIR]

Random weights of the preset are saved once in the Hugging Face layout (``model.safetensors``). Timed in
alternating rounds in this process (the file in the page cache after the first):

- ours: ``pipeline.models.load_model`` (the weights read straight into the parameters, hashed on a thread
  of their own as they are filled), the identity's hash included;
- plain: the model built on the meta device, the safetensors library's ``load_file`` assigned to it
  (``load_state_dict(assign=True)``: no copy), then the hash;
- hash alone: :func:`xclip_core.weights_hash.weights_sha256` of the loaded model, which no load that hashes
  the weights it loads can beat on one hashing thread.

Printed: each one's best and median seconds and the ratios plain / ours and ours / hash alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.models import load_model  # noqa: E402
from xclip_core import XCLIPModel  # noqa: E402
from xclip_core.config import XCLIPConfig  # noqa: E402
from xclip_core.default_model import named_config  # noqa: E402
from xclip_core.weights_hash import weights_sha256  # noqa: E402


def plain_load(checkpoint: Path) -> str:
    config = XCLIPConfig.from_dict(json.loads((checkpoint / "config.json").read_text()))
    with torch.device("meta"):  # no random initialization, as ours
        model = XCLIPModel(config)
    model.load_state_dict(safetensors.torch.load_file(checkpoint / "model.safetensors"), assign=True)
    return weights_sha256(model)


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", default="xclip-base-patch32", help="a published geometry, or videosearch-tiny"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "videosearch-bench-model-load"
    )
    args = parser.parse_args()
    checkpoint = args.workdir / args.preset
    if not (checkpoint / "model.safetensors").exists():
        torch.manual_seed(0)
        XCLIPModel(named_config(args.preset)).save_pretrained(checkpoint)
    model = load_model(str(checkpoint))
    if model.identity.sha256 != plain_load(checkpoint):
        raise SystemExit("the loaded model's hash differs from the plain load's")
    megabytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    calls = {
        "ours": lambda: load_model(str(checkpoint)).identity,
        "plain": lambda: plain_load(checkpoint),
        "hash alone": lambda: weights_sha256(model),
    }
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):  # alternating, so that the machine's drifts fall on all alike
        for name, call in calls.items():
            seconds[name].append(timed(call))
    print(
        f"{args.preset}: {megabytes:.0f} MB of float32 weights, {args.rounds} alternating rounds, "
        f"{torch.get_num_threads()} torch threads"
    )
    for name, times in seconds.items():
        print(f"  {name:10s} best {min(times):6.3f} s, median {statistics.median(times):6.3f} s")
    best = {name: min(times) for name, times in seconds.items()}
    print(f"  plain / ours (best): {best['plain'] / best['ours']:.2f}x")
    print(f"  ours / hash alone (best; 1.0 is the floor): {best['ours'] / best['hash alone']:.2f}")


if __name__ == "__main__":
    main()
