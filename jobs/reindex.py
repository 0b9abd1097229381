"""Entry point for ``ray job submit``: rebuild a library's index, with the same arguments as
``videosearch reindex``. It runs on one node (the job's driver): give it one with memory for the index.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/reindex.py \\
        s3://bucket/library --kind ivfpq
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["reindex", *sys.argv[1:]]))
