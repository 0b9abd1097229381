"""Reading the tensors of a TorchScript archive (``torch.jit.save``) without loading or running it.

OpenAI released CLIP as TorchScript ``.pt`` files, which ``torch.load(weights_only=True)`` refuses and
``torch.jit.load`` would compile and instantiate. The archive is a zip: ``<root>/data.pkl`` pickles the module
tree, each module an object of a ``__torch__.*`` class whose state is a dict of its attributes (submodules,
parameters, buffers, flags), each tensor a ``torch._utils._rebuild_tensor_v2`` of a storage kept in
``<root>/data/<key>``; ``<root>/code/`` holds the TorchScript source, never read here.

:func:`read_torchscript` unpickles ``data.pkl`` with a restricted unpickler: ``__torch__.*`` classes become
inert attribute holders, tensors are rebuilt from the raw storage bytes, a few list builders of
``torch.jit._pickle`` are replaced by plain functions, and any other global refuses the file. The tensors are
then collected by attribute path (``visual.conv1.weight``...), which is what ``state_dict()`` of the loaded
module would name them.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, Any

import torch

from ..checkpoints import CheckpointError
from ..sources import ModelSource

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_ZIP_MAGIC = b"PK\x03\x04"


class ScriptObject:
    """An inert stand-in for a pickled TorchScript object: it keeps the attributes it is given."""

    qualified_name = "__torch__"
    attributes: dict[str, Any]

    def __new__(cls, *args: Any) -> ScriptObject:  # pickle's NEWOBJ creates objects without __init__
        obj = super().__new__(cls)
        obj.attributes = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        # a module's state is a dict of its attributes; objects with a custom __getstate__ hold other things
        self.attributes = dict(state) if isinstance(state, dict) else {}


def _rebuild_tensor(
    storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


def _first(value: Any, *_: Any) -> Any:
    return value


#: The only functions a module pickle may call, as plain replacements (never torch's own objects).
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": OrderedDict,
    **{
        f"torch.jit._pickle.{name}": _first
        for name in (
            "build_intlist",
            "build_doublelist",
            "build_boollist",
            "build_tensorlist",
            "restore_type_tag",
        )
    },
}


class _ScriptUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], read_storage: Callable[[str], bytes], where: str):
        super().__init__(file)
        self._read_storage = read_storage
        self._where = where
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (ScriptObject,), {"qualified_name": qualified})
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if qualified in _FUNCTIONS:
            return _FUNCTIONS[qualified]
        raise CheckpointError(
            f"{self._where}: refused to load: its pickle calls {qualified}, which is not a tensor or module "
            "constructor. Nothing of it was executed."
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        # ("storage", dtype (from find_class), key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._where}: unknown persistent id {pid!r} in data.pkl")
        _, dtype, key, _, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self._where}: storage {key!r} has no known dtype ({dtype!r})")
        if key not in self._storages:
            data = self._read_storage(str(key))
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(data) != numel * itemsize:
                raise CheckpointError(
                    f"{self._where}: storage {key!r} holds {len(data)} bytes, expected {numel * itemsize}: "
                    "the file is truncated or corrupt"
                )
            flat = torch.frombuffer(bytearray(data), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
            self._storages[key] = flat
        return self._storages[key]


def is_torchscript(source: ModelSource, name: str = "") -> bool:
    """True when the file is a zip archive written by ``torch.jit.save`` (it has a ``constants.pkl``)."""
    path = source.path(name)
    try:
        with source.fs.open(path, "rb") as f:
            if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                return False
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False  # not readable as a zip: the ordinary loader reports what is wrong


def read_torchscript(source: ModelSource, name: str = "") -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted attribute path, on CPU.

    Raises ``CheckpointError`` for a truncated or corrupt archive, a big-endian one, and a pickle that calls
    anything but tensor and list constructors.
    """
    where = source.uri if not name else f"{source.uri.rstrip('/')}/{name}"
    try:
        with source.fs.open(source.path(name), "rb") as f, zipfile.ZipFile(f) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if not pickles:
                raise CheckpointError(f"{where}: not a TorchScript archive (no <root>/data.pkl)")
            root = pickles[0].split("/")[0]
            if f"{root}/byteorder" in archive.namelist() and archive.read(f"{root}/byteorder") != b"little":
                raise CheckpointError(f"{where}: big-endian TorchScript archives are not supported")
            with archive.open(f"{root}/data.pkl") as data:
                module = _ScriptUnpickler(data, lambda key: archive.read(f"{root}/data/{key}"), where).load()
    except CheckpointError:
        raise
    except Exception as err:  # zipfile.BadZipFile, KeyError (a missing member), EOFError, pickle errors...
        detail = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"{where} is truncated, corrupt or not a TorchScript archive ({type(err).__name__}: {detail})"
        ) from None
    if not isinstance(module, ScriptObject):
        raise CheckpointError(f"{where}: data.pkl holds {type(module).__name__}, not a TorchScript module")
    tensors: dict[str, torch.Tensor] = {}
    _collect(module, "", tensors, set())
    if not tensors:
        raise CheckpointError(f"{where}: the TorchScript module holds no tensors")
    return tensors


def _collect(obj: ScriptObject, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    seen.add(id(obj))
    for name, value in obj.attributes.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, ScriptObject) and id(value) not in seen:
            _collect(value, f"{prefix}{name}.", out, seen)
