"""videosearch's pipeline: embed videos from object storage on Ray Data; search the libraries it builds.

One call to search: ``pipeline.Searcher.open("s3://bucket/library").search("a dog catching a frisbee")``.
``pipeline.Library`` reads a library's rows and versions without a model. Both are imported on first use,
so that ``import pipeline.storage`` (in a Ray worker, say) stays light.
"""

from __future__ import annotations

from .lazy import lazy_exports

_EXPORTS = {"Library": "pipeline.library", "Searcher": "pipeline.search"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
