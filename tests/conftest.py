"""Shared fixtures (helpers: ``helpers.py``). S3 is a real moto server spoken to over HTTP on 127.0.0.1.

Tests of whole jobs live in ``e2e/``; any other test that uses the moto server is marked ``e2e`` here too, so
that ``pytest -m "not e2e"`` runs the fast unit tests alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import AWS_CLEARED, AWS_TEST_ENV, MotoS3, free_port, perturbed, stop, wait_until_up

from pipeline.storage import StorageOptions
from xclip_core import TextConfig, VisionConfig, XCLIPConfig, XCLIPModel
from xclip_core.processor import XCLIPProcessor
from xclip_core.tokenizer import CLIPTokenizer
from xclip_core.video_transforms import VideoPreprocessor


@pytest.fixture(scope="session", autouse=True)
def local_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder of the local copies ``query`` keeps of remote libraries: the session's own, not the
    user's ``~/.cache`` (the CLI runs in subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("videosearch-cache")
        mp.setenv("VIDEOSEARCH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """A moto S3 server for the session, with dummy AWS credentials in the environment while it runs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with pytest.MonkeyPatch.context() as mp, open(log, "wb") as log_file:
        for name in AWS_CLEARED:
            mp.delenv(name, raising=False)
        for name, value in AWS_TEST_ENV.items():
            mp.setenv(name, value)
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        try:
            wait_until_up(proc, url, log)
            yield MotoS3(endpoint_url=url, options=StorageOptions(endpoint_url=url, region="us-east-1"))
        finally:
            stop(proc)


@pytest.fixture(autouse=True, scope="module")
def no_ray_left_running() -> Iterator[None]:
    """A test module that starts Ray in this process (an in-process job, the demo) stops it when it is done:
    a later module never drives a stale Ray runtime, whose death would end this process without a word."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def closed_endpoint() -> str:
    """An http://127.0.0.1 URL on which nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def bucket(s3: MotoS3) -> Iterator[str]:
    """A new, empty bucket on the moto server; s3fs's instance cache is cleared around each test."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3.make_bucket()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random X-CLIP (32 px, patch 16, 4 frames, one or two layers per block) with its processor files.

    Every parameter is perturbed away from the initialisation (LayerNorms of 1, zero biases...), so that no
    part of the model is an identity that could hide a mix-up. The text tower keeps CLIP's vocabulary and
    77-token context, so the standard tokenizer fits.
    """
    torch.manual_seed(1234)
    config = XCLIPConfig(
        text_config=TextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
        vision_config=VisionConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=16,
            num_frames=4,
            mit_hidden_size=32,
            mit_intermediate_size=64,
            mit_num_hidden_layers=1,
            mit_num_attention_heads=4,
        ),
        projection_dim=32,
        prompt_layers=1,
        prompt_num_attention_heads=4,
    )
    model = perturbed(XCLIPModel(config))
    directory = tmp_path_factory.mktemp("models") / "tiny-xclip"
    model.save_pretrained(directory)
    XCLIPProcessor(CLIPTokenizer.from_pretrained(), VideoPreprocessor(size=32, crop_size=32)).save_pretrained(
        directory
    )
    return directory


E2E_FIXTURES = {"s3", "bucket"}  # a test that talks to the moto server is end-to-end wherever it lives


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark as ``e2e`` every test under ``e2e/`` and every test that uses the moto server."""
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if item.path.is_relative_to(e2e) or E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
