"""Reading ``.safetensors`` files one tensor at a time with plain reads: no memory map, no whole-file buffer.

A checkpoint is read straight into the model's parameters, so loading takes the model's memory plus one
tensor, and a file on object storage is fetched in sequential ranges instead of as one blob. (The
``safetensors`` library, which writes our files, reads either a local path through a memory map or a whole
file's bytes; neither gives that bound for a checkpoint on object storage.)

The format: an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`` (offsets relative to the end of the header), then
the tensors' bytes, little-endian and contiguous.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in its file."""

    dtype: torch.dtype
    shape: torch.Size
    start: int  # absolute byte offsets in the file
    end: int


def read_header(file: IO[bytes], size: int) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file of ``size`` bytes, by name, in file order.

    Raises ``ValueError`` saying what is wrong when the header is malformed or a tensor lies past the end of
    the file (a truncated download).
    """
    file.seek(0)
    prefix = file.read(8)
    if len(prefix) < 8:
        raise ValueError(f"{size} bytes is too short for a safetensors header")
    length = int.from_bytes(prefix, "little")
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise ValueError(f"header length {length} does not fit the file's {size} bytes")
    try:
        header = json.loads(file.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + length
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape = DTYPES[entry["dtype"]], torch.Size(entry["shape"])
            begin, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has a malformed entry {entry!r}") from None
        if not 0 <= begin <= end or end - begin != shape.numel() * dtype.itemsize:
            raise ValueError(
                f"tensor {name!r}: bytes {begin}..{end} do not hold a {entry['dtype']} {list(shape)}"
            )
        if base + end > size:
            raise ValueError(
                f"tensor {name!r} ends at byte {base + end}, past the end of the file ({size} bytes)"
            )
        tensors[name] = StoredTensor(dtype, shape, base + begin, base + end)
    return dict(sorted(tensors.items(), key=lambda item: item[1].start))


def read_tensor(file: IO[bytes], stored: StoredTensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor, read into ``into`` when that is a contiguous CPU tensor of its dtype and shape (a model's
    parameter: no copy follows), else into its own writable CPU memory (callers copy it where it belongs)."""
    fits = (
        into is not None
        and into.device.type == "cpu"
        and into.dtype == stored.dtype
        and into.shape == stored.shape
        and into.is_contiguous()
    )
    tensor = into if fits else torch.empty(stored.shape, dtype=stored.dtype)  # not zeroed: every byte is read
    if not tensor.numel():
        return tensor
    file.seek(stored.start)
    view, done = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), 0
    while done < len(view):
        count = file.readinto(view[done:])
        if not count:
            raise ValueError(f"file ended {len(view) - done} bytes short of a tensor")
        done += count
    return tensor
