"""Shared fixtures. S3 is a real moto server spoken to over HTTP on 127.0.0.1, as in s3fs's own test suite."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from models import perturbed

from pipeline.storage import StorageOptions
from xclip_core import TextConfig, VisionConfig, XCLIPConfig, XCLIPModel
from xclip_core.processor import XCLIPProcessor
from xclip_core.tokenizer import CLIPTokenizer
from xclip_core.video_transforms import VideoPreprocessor

# Dummy credentials for the moto server, no proxy for it; what could point botocore elsewhere is cleared.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
AWS_CLEARED = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoS3:
    """A running moto S3 server."""

    endpoint_url: str
    options: StorageOptions

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a fresh unique name and return the name."""
        import s3fs

        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        s3fs.S3FileSystem(endpoint_url=self.endpoint_url, skip_instance_cache=True).mkdir(name)
        return name


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {url} in {timeout:.0f} s:\n{log.read_text()[-2000:]}")


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
            _wait_until_up(proc, url, log)
            yield MotoS3(endpoint_url=url, options=StorageOptions(endpoint_url=url, region="us-east-1"))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
