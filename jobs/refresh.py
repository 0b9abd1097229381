"""Entry point for ``ray job submit``: the refresh job, with the same arguments as ``videosearch refresh``.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/refresh.py \\
        s3://bucket/videos/ s3://bucket/library --model s3://bucket/models/xclip-base-patch32

Inside a Ray job the driver joins the job's cluster (``ray.init()`` finds it), so ``--address`` is not needed.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["refresh", *sys.argv[1:]]))
