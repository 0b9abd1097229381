"""Entry point for ``ray job submit``: an evaluation, with the same arguments as ``videosearch eval``.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/eval.py \\
        s3://bucket/library --captions s3://bucket/clips/captions.csv

Evaluation runs in the driver (it needs no actors); on the cluster it reads the library where the cluster can.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
