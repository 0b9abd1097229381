"""A model's identity: where its weights came from and their hash, one name for every model family.

Libraries record it in their manifests and on every row (``tag``), the encoder reports it, and search uses
it to load the model that built a library and to refuse one whose weights differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelIdentity:
    """``source``: the checkpoint as given (a path, URL or name); ``sha256``: hex SHA-256 of the weights as
    loaded (float32; see :mod:`xclip_core.weights_hash`); ``family``: the model family (``"xclip"``...)."""

    source: str
    sha256: str
    family: str = "xclip"

    @property
    def tag(self) -> str:
        """``"<source>@<first 16 hex digits of sha256>"``: the short form stored on each library row."""
        return f"{self.source}@{self.sha256[:16]}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        """Read :meth:`to_dict`'s form, or the ``{"id", "sha256"}`` of manifests of format 1 (X-CLIP)."""
        if "source" not in data and "id" in data:
            return cls(str(data["id"]), str(data.get("sha256", "")), "xclip")
        try:
            return cls(str(data["source"]), str(data["sha256"]), str(data.get("family", "xclip")))
        except KeyError as err:
            raise ValueError(f"a model identity needs {err.args[0]!r}: {data}") from None
