"""videosearch pipeline: list, read, decode and embed videos on Ray Data; keep the library on storage."""
