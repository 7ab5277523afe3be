"""Local and gs:// file access (against a real GCS emulator), and loading a model from gs://."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.trainer import storage
from posttrain.trainer.models import load_pretrained, save_pretrained
from posttrain.trainer.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_split_and_join():
    assert storage.split_gcs("gs://b/a/c.json") == ("b", "a/c.json")
    assert storage.join("gs://b/dir/", "x", "y.json") == "gs://b/dir/x/y.json"
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_gcs("gs:///x")


@pytest.mark.parametrize("remote", [False, True], ids=["local", "gcs"])
def test_read_write_list(tmp_path, request, remote):
    root = f"gs://{request.getfixturevalue('gcs_emulator')}/rw" if remote else str(tmp_path)
    storage.write_text(storage.join(root, "a.txt"), "héllo")
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01")
    with storage.open_file(storage.join(root, "sub", "c.txt"), "w") as f:
        f.write("streamed")
    assert storage.read_text(storage.join(root, "a.txt")) == "héllo"
    assert storage.read_bytes(storage.join(root, "sub", "b.bin")) == b"\x00\x01"
    with storage.open_file(storage.join(root, "sub", "c.txt"), "r") as f:
        assert f.read() == "streamed"
    assert storage.list_dir(root) == ["a.txt", "sub/"]
    assert storage.list_dir(root, recursive=True) == ["a.txt", "sub/b.bin", "sub/c.txt"]
    assert storage.exists(storage.join(root, "a.txt")) and storage.exists(storage.join(root, "sub"))
    assert not storage.exists(storage.join(root, "nope.txt"))


def test_download_dir_caches(gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    root = f"gs://{gcs_emulator}/dl"
    storage.write_text(f"{root}/x.json", "{}")
    storage.write_text(f"{root}/deep/y.txt", "y")
    local = storage.download_dir(root)
    assert local.startswith(str(tmp_path / "cache"))
    assert storage.list_dir(local, recursive=True) == ["deep/y.txt", "x.json"]
    only_json = storage.download_dir(root, str(tmp_path / "filtered"), allow_patterns=["*.json"])
    assert storage.list_dir(only_json, recursive=True) == ["x.json"]
    with pytest.raises(FileNotFoundError, match="no files"):
        storage.download_dir(f"gs://{gcs_emulator}/empty")


def test_model_and_tokenizer_from_gcs(gcs_emulator, tmp_path, monkeypatch):
    """Upload a fixture, load it from gs://, get HF's logits; save_pretrained back to gs:// round-trips."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    fixture = FIXTURES / "hf-reference" / "qwen2-bias-tied"
    remote = f"gs://{gcs_emulator}/models/qwen2"
    for name in ("config.json", "model.safetensors"):
        storage.write_bytes(f"{remote}/{name}", (fixture / name).read_bytes())
    storage.upload_dir(str(FIXTURES / "tokenizer"), f"gs://{gcs_emulator}/tok")

    model = load_pretrained(remote)
    ref = np.load(fixture / "reference.npz")
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ref["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=1e-4)

    save_pretrained(model, f"gs://{gcs_emulator}/models/qwen2-copy")
    assert (
        storage.read_bytes(f"gs://{gcs_emulator}/models/qwen2-copy/model.safetensors")
        == (fixture / "model.safetensors").read_bytes()
    )

    tok = Tokenizer.from_pretrained(f"gs://{gcs_emulator}/tok")
    assert tok.eos_id == 2
