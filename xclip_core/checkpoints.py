"""Reading, converting, checking and writing X-CLIP weights.

Two key layouts exist. The Hugging Face layout (``transformers.XCLIPModel``) is the one ``xclip_core`` uses;
the original release (github.com/microsoft/VideoX, ``X-CLIP/``) saves ``.pth`` files with CLIP's names, fused
``in_proj`` attention weights and ``x @ W`` projection matrices, inside a training snapshot
(``{"model", "optimizer", "lr_scheduler", "max_accuracy", "epoch", "config": <yacs CfgNode>}``).

Loading never executes code from a checkpoint: safetensors hold no code, and torch files are read with
``weights_only=True`` or, for training snapshots that hold other objects, with a restricted unpickler. Of a
local torch file in the zip format (``torch.save``'s since torch 1.6) only the state dict's tensors are read:
a training snapshot's optimizer state, twice the size of the weights it trains, costs no memory. Other torch
files (remote, or in the legacy format) are read whole.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import re
import types
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import fsspec
import safetensors.torch
import torch
from fsspec.implementations.local import LocalFileSystem

from . import safetensors_reader
from .ahead_reader import AheadReader
from .config import TextConfig, VisionConfig, XCLIPConfig
from .sources import ModelSource
from .weights_hash import HashWhileLoading


class CheckpointError(ValueError):
    """A checkpoint cannot be read, is unsafe, or does not match the model."""


# ----------------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------------

#: Builtin types of plain data that pickle rebuilds by calling them (protocol 2: a ``set`` as ``set([...])``,
#: an empty ``bytes`` as ``bytes()``). Protocol 2 names their module ``__builtin__``, protocol 3 ``builtins``.
_PLAIN_BUILTINS = (set, frozenset, bytes, bytearray, complex)

#: Globals a pickled training snapshot needs besides storages (which torch resolves itself): those of tensors
#: and of plain data (what torch's ``weights_only`` loader allows of it, with ``frozenset`` and an empty
#: ``bytes``). The types are C types a pickle cannot modify; functions (and ``Counter``, a Python class) are
#: handed out as fresh wrappers, so a pickle cannot modify them.
_SAFE_TYPES: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    **{f"torch.{name}": value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    **{f"{module}.{t.__name__}": t for t in _PLAIN_BUILTINS for module in ("builtins", "__builtin__")},
}
_SAFE_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "collections.Counter": Counter,
    "_codecs.encode": codecs.encode,  # protocol 2 writes non-empty bytes as _codecs.encode(text, "latin1")
}


class _Refused(Exception):
    """Raised when a pickle calls a global that is not allow-listed."""


class _RefuseCalls(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _Refused(f"{cls.__module__}.{cls.__qualname__}")


class _Inert(metaclass=_RefuseCalls):
    """Stands in for any global that is not allow-listed (a yacs ``CfgNode``, ``os.system``...).

    The global's module is never imported. The placeholder class can be instantiated the way pickle rebuilds
    plain objects (``cls.__new__``, then state and items), and all it does is ignore what it is given; calling
    it, the way a pickle calls a function (``REDUCE``), raises ``_Refused``.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified in _SAFE_TYPES:
            return _SAFE_TYPES[qualified]
        if qualified in _SAFE_FUNCTIONS:
            function = _SAFE_FUNCTIONS[qualified]
            return lambda *args, **kwargs: function(*args, **kwargs)
        return _RefuseCalls(name, (_Inert,), {"__module__": module, "__qualname__": name})


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


#: Passed to ``torch.load`` as its ``pickle_module``: torch subclasses ``Unpickler`` (resolving storage types
#: itself and deferring every other global to our ``find_class``) and calls ``load`` for the legacy format.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="xclip_core.restricted_pickle", Unpickler=_RestrictedUnpickler, load=_restricted_load
)


def _torch_load(data_or_zip_path: bytes | str, where: str) -> Any:
    """``torch.load`` to CPU of a file's bytes, or of a local zip-format file by its path, memory-mapped.

    Never of a path otherwise: torch tries a legacy-format file as a tar archive first, extracting it to disk.
    """

    def load(**kwargs: Any) -> Any:
        mapped = isinstance(data_or_zip_path, str)
        file = data_or_zip_path if mapped else io.BytesIO(data_or_zip_path)
        return torch.load(file, map_location="cpu", mmap=mapped, **kwargs)

    try:
        return load(weights_only=True)
    except pickle.UnpicklingError:
        pass  # holds objects other than tensors and containers (a training snapshot): read it restricted
    except Exception as err:
        # Includes TorchScript archives, which weights_only refuses with a RuntimeError, so the restricted
        # path below (where torch.load would hand them to torch.jit.load) never sees one.
        raise _unreadable(where, err) from None
    try:
        return load(weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except _Refused as err:
        raise CheckpointError(
            f"{where}: refused to load: its pickle calls {err}, which is not a tensor constructor. A "
            f"checkpoint must only hold tensors and plain data; this one would run code, so nothing of it "
            f"was executed."
        ) from None
    except Exception as err:
        raise _unreadable(where, err) from None


def _unreadable(where: str, err: Exception) -> CheckpointError:
    detail = (str(err).strip().splitlines() or [""])[0]
    return CheckpointError(
        f"{where} is truncated, corrupt or not a checkpoint ({type(err).__name__}: {detail}); "
        f"re-download or re-save it"
    )


def _tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _select_state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    candidates = [obj.get("model"), obj.get("state_dict"), obj] if isinstance(obj, Mapping) else [obj]
    state_dict = next((c for c in candidates if _tensor_dict(c)), None)
    if state_dict is None:
        found = (
            f"a dict with keys {sorted(map(str, obj))[:20]}"
            if isinstance(obj, Mapping)
            else type(obj).__name__
        )
        raise CheckpointError(
            f"{where}: no state dict found: expected a dict of tensors, or one under 'model' or "
            f"'state_dict', but the file holds {found}"
        )
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


#: Where tensors may be read straight into, by name (a model's state dict); see :meth:`Weights.tensors`.
Destinations = Mapping[str, torch.Tensor]


class Weights(Mapping[str, torch.Size]):
    """A checkpoint's tensors: their shapes by name, known before any tensor is read, and ``tensors()``, which
    reads them one at a time (from a safetensors file or a local zip-format torch file: straight from storage,
    so a model loads without a second copy of its weights in memory)."""

    def __init__(
        self,
        shapes: Mapping[str, torch.Size],
        tensors: Callable[[Destinations | None], Iterator[tuple[str, torch.Tensor]]],
    ):
        self.shapes = dict(shapes)
        self._tensors = tensors

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> Weights:
        """Weights already in memory."""
        return cls({k: v.shape for k, v in state_dict.items()}, lambda _: iter(state_dict.items()))

    def __getitem__(self, key: str) -> torch.Size:
        return self.shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def tensors(self, into: Destinations | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every tensor, on CPU. A safetensors file reads a tensor straight into
        ``into[name]`` where that is a contiguous CPU tensor of its dtype and shape, and yields it: a model's
        state dict loads without a copy."""
        return (item for item in self._tensors(into) if item[0] in self.shapes)

    def without(self, drop: Callable[[str], bool]) -> Weights:
        """These weights less the names for which ``drop`` is true."""
        return Weights({k: v for k, v in self.shapes.items() if not drop(k)}, self.tensors)


def open_weights(source_or_path: ModelSource | str | os.PathLike, name: str | None = None) -> Weights:
    """The weights in ``.safetensors`` (one file or a sharded ``.safetensors.index.json``), or in a torch
    ``.bin``/``.pth``/``.pt`` file.

    ``source_or_path`` is a ``ModelSource`` or a local path or fsspec URL; ``name`` is the file inside it, or
    ``None`` when ``source_or_path`` is the file itself. Safetensors headers are read (and checked against
    the file's size) at once and tensors on demand; torch files are read with ``torch.load``, memory-mapped
    where they can be (see ``_torch_weights``).
    Raises ``CheckpointError`` for unreadable files, for pickles that would run code, and when no state dict
    is found.
    """
    source = source_or_path if isinstance(source_or_path, ModelSource) else ModelSource(source_or_path)
    where = f"{source.uri.rstrip('/')}/{name}" if name else source.uri
    if where.endswith(".safetensors.index.json"):  # sharded: the index maps every tensor to its shard file
        shards = sorted(set(source.read_json(name or "").get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{where} names no weight files")
        parts = [open_weights(source, shard) for shard in shards]
        shapes = {key: shape for part in parts for key, shape in part.items()}
        return Weights(shapes, lambda into: (item for part in parts for item in part.tensors(into)))
    if where.endswith(".safetensors"):
        return _safetensors_weights(source, name or "", where)
    return _torch_weights(source, name or "", where)


#: How a zip file (``torch.save``'s format since torch 1.6) starts: a zip local file header.
_ZIP_MAGIC = b"PK\x03\x04"


def _is_local_zip(source: ModelSource, path: str) -> bool:
    if not isinstance(source.fs, LocalFileSystem):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    except OSError:
        return False  # reading it whole reports what is wrong


def _torch_weights(source: ModelSource, name: str, where: str) -> Weights:
    """The state dict in a torch file (a training snapshot's ``"model"``), its other tensors read if need be.

    A local zip-format file is memory-mapped (``torch.load(mmap=True)``): the rest of a snapshot, its
    optimizer state above all, is never read, and each of the state dict's tensors is read (copied out of
    the map, so that none outlives loading as a view of the file) only when ``tensors()`` reaches it. Any
    other file is read whole into memory, and every tensor in it with it: torch maps only a local path, and
    its loader of the legacy format reads every storage once the pickle is read.
    """
    path = source.path(name)
    if not _is_local_zip(source, path):
        return Weights.of(_select_state_dict(_torch_load(source.read_bytes(name), where), where))
    state_dict = _select_state_dict(_torch_load(path, where), where)
    return Weights(
        {k: v.shape for k, v in state_dict.items()}, lambda _: ((k, v.clone()) for k, v in state_dict.items())
    )


HEADER_BLOCK = 1 << 20  # bytes a remote safetensors file's header is read in (most headers: ~100 KB)


def _safetensors_weights(source: ModelSource, name: str, where: str) -> Weights:
    path = source.path(name)
    try:
        size = source.fs.size(path)
        with source.fs.open(path, "rb", block_size=HEADER_BLOCK) as f:  # not the 50 MB s3fs reads ahead
            stored = safetensors_reader.read_header(f, size)
    except FileNotFoundError:
        raise FileNotFoundError(f"{source.uri}: no file {name!r} (looked for {path})") from None
    except ValueError as err:
        raise _unreadable(where, err) from None
    if not stored:
        raise CheckpointError(f"{where}: no state dict found: the file holds no tensors")

    def tensors(into: Destinations | None) -> Iterator[tuple[str, torch.Tensor]]:
        remote = not isinstance(source.fs, LocalFileSystem)  # a remote file: ranges fetched ahead, at once
        opened = AheadReader(source.fs, path, size) if remote else source.fs.open(path, "rb")
        with opened as f:
            for stored_key, entry in stored.items():
                key = stored_key.removeprefix("module.")
                try:
                    tensor = safetensors_reader.read_tensor(f, entry, (into or {}).get(key))
                except ValueError as err:
                    raise _unreadable(where, err) from None
                yield key, tensor

    return Weights({k.removeprefix("module."): v.shape for k, v in stored.items()}, tensors)


def load_tensors(
    source_or_path: ModelSource | str | os.PathLike, name: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a whole state dict into memory, on CPU: :func:`open_weights`, every tensor read.

    Torch files may be training snapshots: the state dict is taken from their ``"model"`` or ``"state_dict"``
    entry, and a DataParallel ``module.`` prefix is removed.
    """
    return dict(open_weights(source_or_path, name).tensors())


# ----------------------------------------------------------------------------------------------------
# Key layouts
# ----------------------------------------------------------------------------------------------------

_LAYER_NORMS = {
    "ln_final": "text_model.final_layer_norm",
    "visual.ln_pre": "vision_model.pre_layernorm",
    "visual.ln_post": "vision_model.post_layernorm",
    "prompts_visual_ln": "prompts_visual_layernorm",
    "prompts_generator.norm": "prompts_generator.layernorm",
}
#: Whole-key renames, original -> Hugging Face. Keys not listed here or under ``_BLOCKS`` keep their name
#: (``logit_scale``, ``prompts_generator.alpha``, ``prompts_generator.decoder.*``).
_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text_projection": "text_projection.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.proj": "visual_projection.weight",
    "prompts_visual_proj": "prompts_visual_projection",
    "mit.positional_embedding": "mit.position_embedding",
    **{f"{old}.{p}": f"{new}.{p}" for old, new in _LAYER_NORMS.items() for p in ("weight", "bias")},
}
#: Original ``x @ W`` matrices that are ``nn.Linear`` weights (``W.T``) in Hugging Face.
_TRANSPOSED = {"text_projection", "visual.proj"}
#: Transformer blocks, original prefix -> Hugging Face prefix, and the renames inside a block.
_BLOCKS = {
    "transformer.resblocks.": "text_model.encoder.layers.",
    "visual.transformer.resblocks.": "vision_model.encoder.layers.",
    "mit.resblocks.": "mit.encoder.layers.",
}
_BLOCK_PARTS = {
    "attn.": "self_attn.",
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
#: Keys without weights: OpenAI CLIP's integer metadata (dropped by the original ``build_model``) and the
#: ``position_ids`` buffers that older ``transformers`` versions saved. Both conversions drop them.
IGNORED_KEYS = frozenset(
    {
        "input_resolution",
        "context_length",
        "vocab_size",
        "text_model.embeddings.position_ids",
        "vision_model.embeddings.position_ids",
    }
)
# nn.MultiheadAttention's fused ``in_proj`` (rows: q, k, v) <-> separate q/k/v projections. The prompt
# generator's ``cross_attn`` has separate projections in both layouts.
_FUSED = re.compile(r"(?P<attn>.+\.(?:attn|message_attn))\.in_proj_(?P<kind>weight|bias)")
_SPLIT = re.compile(r"(?P<attn>.+\.(?:attn|message_attn))\.(?P<qkv>[qkv])_proj\.(?P<kind>weight|bias)")


def _rename(key: str, to_hf: bool) -> str:
    def direction(table: dict[str, str]) -> dict[str, str]:
        return table if to_hf else {new: old for old, new in table.items()}

    renames = direction(_RENAMES)
    if key in renames:
        return renames[key]
    for prefix, new_prefix in direction(_BLOCKS).items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            part = next((p for p in direction(_BLOCK_PARTS) if rest.startswith(p)), None)
            if part is not None:
                rest = direction(_BLOCK_PARTS)[part] + rest[len(part) :]
            return f"{new_prefix}{index}.{rest}"
    return key


def original_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an original-release state dict to ``transformers.XCLIPModel`` key names and shapes.

    Fused ``in_proj`` attention weights are split into q/k/v projections, ``text_projection`` and
    ``visual.proj`` are transposed into ``nn.Linear`` weights, and ``IGNORED_KEYS`` are dropped. Unknown keys
    pass through unchanged (``check_state_dict`` then reports them).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in IGNORED_KEYS:
            continue
        fused = _FUSED.fullmatch(key)
        if fused is None:
            out[_rename(key, to_hf=True)] = value.T.contiguous() if key in _TRANSPOSED else value
            continue
        attn = _rename(fused["attn"] + ".", to_hf=True)
        for qkv, part in zip("qkv", value.chunk(3), strict=True):
            out[f"{attn}{qkv}_proj.{fused['kind']}"] = part
    return out


def hf_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a ``transformers.XCLIPModel`` state dict to the original release's names and shapes.

    The exact inverse of ``original_to_hf``; raises ``CheckpointError`` when an attention layer lacks one of
    its q/k/v projections.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in IGNORED_KEYS:
            continue
        name = _rename(key, to_hf=False)
        split = _SPLIT.fullmatch(name)
        if split is None:
            out[name] = value.T.contiguous() if name in _TRANSPOSED else value
        else:
            fused.setdefault((split["attn"], split["kind"]), {})[split["qkv"]] = value
    for (attn, kind), parts in fused.items():
        if len(parts) != 3:
            missing = [f"{qkv}_proj" for qkv in "qkv" if qkv not in parts]
            raise CheckpointError(f"{attn}: attention {kind} lacks {', '.join(missing)}")
        out[f"{attn}.in_proj_{kind}"] = torch.cat([parts[qkv] for qkv in "qkv"])
    return out


def is_original_layout(state_dict: Mapping[str, Any]) -> bool:
    """True for the original release's key names (``visual.*``, ``transformer.resblocks.*``)."""
    return any(key.startswith(("visual.", "transformer.resblocks.")) for key in state_dict)


def _heads(width: int) -> int:
    # The original fixes every attention head at 64 channels (at least one head for tiny test models).
    return max(1, width // 64)


def config_from_original(
    state_dict: Mapping[str, torch.Tensor], num_frames: int | None = None
) -> XCLIPConfig:
    """Infer the model geometry from an original-layout state dict, as the original ``build_model`` does.

    Widths, layer counts, patch and image size, context length, vocabulary and projection size come from
    tensor shapes; every attention block (vision incl. its message attention, text, MIT, prompt generator) has
    ``width // 64`` heads, as in the original code. The frame count is fixed by ``mit.positional_embedding``;
    a ``num_frames`` that differs from it raises ``CheckpointError``.
    """

    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise CheckpointError(f"not an original X-CLIP state dict: it has no {key!r}")
        return state_dict[key].shape

    def count(prefix: str) -> int:
        return len({key[len(prefix) :].split(".")[0] for key in state_dict if key.startswith(prefix)})

    vision_width, channels, patch, _ = shape("visual.conv1.weight")
    grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
    text_width = shape("ln_final.weight")[0]
    projection_dim = shape("text_projection")[1]
    _, frames, mit_width = shape("mit.positional_embedding")
    if num_frames is not None and num_frames != frames:
        raise CheckpointError(
            f"the checkpoint's MIT is trained for {frames} frames (mit.positional_embedding), "
            f"not {num_frames}"
        )
    text = TextConfig(
        vocab_size=shape("token_embedding.weight")[0],
        hidden_size=text_width,
        intermediate_size=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=count("transformer.resblocks."),
        num_attention_heads=_heads(text_width),
        max_position_embeddings=shape("positional_embedding")[0],
    )
    vision = VisionConfig(
        hidden_size=vision_width,
        intermediate_size=shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=count("visual.transformer.resblocks."),
        num_attention_heads=_heads(vision_width),
        mit_hidden_size=mit_width,
        mit_intermediate_size=shape("mit.resblocks.0.mlp.c_fc.weight")[0],
        mit_num_hidden_layers=count("mit.resblocks."),
        mit_num_attention_heads=_heads(mit_width),
        num_channels=channels,
        image_size=patch * grid,
        patch_size=patch,
        num_frames=frames,
    )
    return XCLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=projection_dim,
        prompt_layers=count("prompts_generator.decoder."),
        prompt_num_attention_heads=_heads(projection_dim),
    )


# ----------------------------------------------------------------------------------------------------
# Validation and saving
# ----------------------------------------------------------------------------------------------------


def check_state_dict(
    expected: Mapping[str, torch.Size], found: Mapping[str, torch.Size], limit: int = 20
) -> None:
    """Raise ``CheckpointError`` listing missing keys, unexpected keys and mis-shaped tensors.

    Both map names to shapes: ``expected`` the model's (``{k: v.shape for k, v in
    model.state_dict().items()}``), ``found`` the checkpoint's (e.g. :class:`Weights`). Each list shows at
    most ``limit`` entries.
    """
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    mis_shaped = [
        f"{key} (expected {tuple(expected[key])}, got {tuple(found[key])})"
        for key in sorted(expected.keys() & found.keys())
        if tuple(found[key]) != tuple(expected[key])
    ]
    problems = [
        (t, items)
        for t, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
        if items
    ]
    if not problems:
        return
    lines = [
        "state dict does not match the model: " + ", ".join(f"{len(items)} {t}" for t, items in problems)
    ]
    if is_original_layout(found) and not is_original_layout(expected):
        lines.append("it has the original release's key names; convert it with original_to_hf() first")
    for title, items in problems:
        more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
        lines.append(f"{title}: {', '.join(items[:limit])}{more}")
    raise CheckpointError("\n  ".join(lines))


def load_into(
    build: Callable[[], torch.nn.Module],
    weights: Mapping[str, torch.Size] | Weights,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """The module that ``build`` makes, filled with ``weights`` (:class:`Weights` in its names), in eval mode.

    The module is built on the meta device (no random initialization: every parameter is about to be
    loaded) and checked against the weights (:func:`check_state_dict`); then each parameter gets fresh
    memory in ``dtype`` on ``device`` and is filled one tensor at a time: loading holds the model plus one
    tensor, never a second copy of the weights (a safetensors file's tensors of the same dtype are read
    straight into the parameters on a CPU). (``torch.empty`` rather than ``Module.to_empty``, whose
    ``empty_like`` of meta tensors imports torch's symbolic-shapes machinery: 0.3 s in every process.)
    The weights are hashed as they are filled (:class:`~xclip_core.weights_hash.HashWhileLoading`), on a
    thread of their own: the module's ``sha256_as_loaded``.
    """
    with torch.device("meta"):
        model = build()
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, weights)
    model = model._apply(
        lambda t: torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
    )
    parameters = model.state_dict()
    with torch.no_grad(), HashWhileLoading(parameters) as hashing:
        for key, tensor in weights.tensors(into=parameters):
            if tensor is not parameters[key]:  # read elsewhere (another dtype or device, a torch file)
                parameters[key].copy_(tensor)
            hashing.filled(key)
    model.sha256_as_loaded = hashing.hexdigest()
    return model.eval()


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    fs_or_path: fsspec.AbstractFileSystem | str | os.PathLike,
    path: str | None = None,
) -> None:
    """Write a state dict as ``.safetensors`` (metadata ``format: pt``, as ``save_pretrained`` writes).

    Call it with a local path or fsspec URL, or with a filesystem and a path on it
    (``save_safetensors(sd, source.fs, source.path("model.safetensors"))``). Tensors are made contiguous and
    moved to CPU; one whose storage an earlier tensor already uses (q/k/v views of one fused matrix, tied
    weights) is copied, since safetensors refuses shared storage.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        tensor = value.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    if path is None:
        fs, path = fsspec.core.url_to_fs(os.fspath(fs_or_path))
    else:
        fs = fs_or_path
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)
