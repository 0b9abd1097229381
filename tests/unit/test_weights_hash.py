"""A model's weights hash is taken while its checkpoint loads, and equals the hash of the weights loaded."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import MotoS3

from pipeline.models import load_model
from pipeline.storage import Store
from xclip_core import XCLIPModel
from xclip_core.checkpoints import save_safetensors
from xclip_core.safetensors_reader import read_header, read_tensor
from xclip_core.weights_hash import HashWhileLoading, weights_sha256


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"b.weight": torch.randn(4, 3), "a.bias": torch.randn(5), "c.scale": torch.tensor(2.0)}


def _module(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose state dict is ``state``."""
    module = torch.nn.Module()
    for key, tensor in state.items():
        name, entry = key.split(".")
        module.add_module(name, torch.nn.Module())
        module.get_submodule(name).register_buffer(entry, tensor)
    assert module.state_dict().keys() == state.keys()
    return module


def test_hashing_while_filling_in_any_order_gives_the_hash_of_the_filled_weights() -> None:
    source, target = _state(0), {key: torch.zeros_like(t) for key, t in _state(1).items()}
    with HashWhileLoading(target) as hashing:
        for key in reversed(sorted(target)):  # the hash takes sorted order: it waits for the last filled
            target[key].copy_(source[key])
            hashing.filled(key)
    assert hashing.hexdigest() == weights_sha256(_module(source)) != weights_sha256(_module(_state(1)))


def test_an_entry_never_reported_filled_is_hashed_as_it_is_when_loading_ends() -> None:
    state = _state()
    with HashWhileLoading(state) as hashing:
        hashing.filled("a.bias")
    assert hashing.hexdigest() == weights_sha256(_module(state))


def test_a_load_that_fails_stops_the_hash_and_has_none() -> None:
    hashing = HashWhileLoading(_state())
    with pytest.raises(OSError, match="store down"), hashing:
        raise OSError("store down")
    assert not hashing._thread.is_alive()
    with pytest.raises(RuntimeError, match="once their loading has ended"):
        hashing.hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_loaded_models_identity_is_the_hash_of_its_weights_as_loaded(tmp_path, tiny_model, dtype) -> None:
    model = XCLIPModel.from_pretrained(tiny_model, dtype=dtype)  # bf16: read, then converted
    assert model.identity.sha256 == model.weights_sha256()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a torch file: its tensors are copied in
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    assert XCLIPModel.from_pretrained(tmp_path, dtype=dtype).identity.sha256 == model.identity.sha256
    changed = XCLIPModel.from_pretrained(tiny_model, dtype=dtype)
    with torch.no_grad():
        changed.mit.position_embedding.add_(1.0)  # before its identity's first use: it names the loaded
    assert changed.identity.sha256 == model.identity.sha256 != changed.weights_sha256()


def test_a_safetensors_tensor_is_read_straight_into_a_parameter_that_fits(tmp_path) -> None:
    state = _state()
    save_safetensors(state, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    stored = read_header(io.BytesIO(data), len(data))
    parameter = torch.empty(4, 3)
    assert read_tensor(io.BytesIO(data), stored["b.weight"], into=parameter) is parameter
    assert torch.equal(parameter, state["b.weight"])
    other = torch.zeros(4, 3, dtype=torch.float64)  # another dtype: read into memory of its own
    read = read_tensor(io.BytesIO(data), stored["b.weight"], into=other)
    assert read is not other and torch.equal(read, state["b.weight"]) and not other.any()


def test_a_checkpoint_on_s3_loads_the_weights_and_identity_of_its_local_copy(s3: MotoS3, bucket, tiny_model):
    remote = Store(f"s3://{bucket}/models/tiny", s3.options)
    for path in tiny_model.iterdir():
        remote.write_bytes(path.name, path.read_bytes())
    local, loaded = load_model(str(tiny_model)), load_model(remote.uri, s3.options)  # read through s3fs
    assert loaded.identity.sha256 == local.identity.sha256 == loaded.weights_sha256()
    expected = local.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items())
