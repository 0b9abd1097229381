"""Entry point for ``ray job submit``: check every file of a library version (and ``--repair``), with the same
arguments as ``videosearch check``. It runs on one node (the job's driver), best one near the library's
storage: it reads every file of the version once. The job fails (exit 1) when it found problems.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/check.py s3://bucket/library
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["check", *sys.argv[1:]]))
