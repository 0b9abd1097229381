"""A model's weights hash (its identity's ``sha256``), and the same hash taken while a checkpoint loads.

The hash covers every state-dict entry in sorted key order, as its name, dtype, shape and raw bytes: equal
for equal weights wherever they were loaded from, and changed by a change of dtype. Hashing a published
checkpoint's weights costs more than reading them (SHA-256 at ~1 GB/s: 0.75 s of base-patch32's 786 MB).
:class:`HashWhileLoading` hashes each entry on a thread of its own as soon as the loader has filled it
(hashlib and file reads release the GIL), so that a load costs little more than its hash alone (1.1x,
``bench/model_load.py``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping

import torch


def weights_sha256(model: torch.nn.Module) -> str:
    """Hex SHA-256 of ``model``'s weights as they are now."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        _hash_entry(digest, key, tensor)
    return digest.hexdigest()


def _hash_entry(digest: hashlib._Hash, key: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


class HashWhileLoading:
    """:func:`weights_sha256` of ``state`` (a module's state dict, its tensors being filled in any order),
    computed on a thread that takes the entries in sorted key order, each once :meth:`filled` says it is.

    Use it as a context manager around the filling: :meth:`hexdigest` after the block is the hash of the
    state as filled (entries never reported filled are hashed as they are when the block ends); a block that
    raises stops the thread."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = state
        self._filled = {key: threading.Event() for key in state}
        self._stopped = False
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weights-sha256", daemon=True)

    def __enter__(self) -> HashWhileLoading:
        self._thread.start()
        return self

    def filled(self, key: str) -> None:
        """``state[key]`` holds its final values."""
        self._filled[key].set()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._stopped = kind is not None
        for event in self._filled.values():
            event.set()
        self._thread.join()

    def hexdigest(self) -> str:
        """The hash, once the filling block has ended without an error."""
        if self._error is not None:
            raise self._error
        if self._digest is None:
            raise RuntimeError("the weights hash is known once their loading has ended")
        return self._digest

    def _run(self) -> None:
        digest = hashlib.sha256()
        try:
            for key in sorted(self._state):
                self._filled[key].wait()
                if self._stopped:
                    return
                _hash_entry(digest, key, self._state[key])
        except BaseException as error:  # noqa: BLE001 - handed to the caller by hexdigest()
            self._error = error
            return
        self._digest = digest.hexdigest()
