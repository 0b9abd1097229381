"""videosearch's pipeline: embed videos from object storage on Ray Data; search the libraries it builds."""

from .library import Library

__all__ = ["Library"]
