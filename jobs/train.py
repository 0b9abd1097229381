"""Entry point for ``ray job submit``: the train job, with the same arguments as ``videosearch train``.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py \\
        s3://bucket/clips/captions.csv s3://bucket/runs/mine --model s3://bucket/models/xclip-base-patch32 \\
        --workers 4 --gpu --epochs 10 --lr 1e-5

Inside a Ray job the driver joins the job's cluster (``ray.init()`` finds it), so ``--address`` is not needed.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
