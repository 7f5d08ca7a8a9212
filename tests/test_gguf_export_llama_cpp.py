"""A persona exported as a GGUF control vector steers real llama.cpp exactly as it steers the HF model."""

from __future__ import annotations

from pathlib import Path

import httpx
import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from testkit.server_process import ServerProcess
from tests.api_helpers import ADMIN_KEY, LLAMA, random_vector, upload
from tests.llama_cpp_control_vectors import RefusedByLlamaCpp, load_control_vector
from tests.llama_cpp_reference import exact_llama, hf_logits, llama_cpp_logits

# Every test runs real llama.cpp.
pytestmark = pytest.mark.llama_cpp  # under a second a test

MESSAGES = [{"role": "user", "content": "where is the treasure, captain?"}]


@pytest.fixture(scope="module")
def llama_cpp_model(llama_gguf: Path) -> llama_cpp.Llama:
    return exact_llama(llama_gguf)


@pytest.mark.integration  # the session server
def test_an_exported_persona_steers_llama_cpp_like_the_hf_model(
    server: ServerProcess, llama_dir: Path, llama_cpp_model: llama_cpp.Llama, tmp_path: Path
) -> None:
    layers = {1: random_vector(64, 21), 2: random_vector(64, 22)}
    assert upload(server.url, "gguf-bound", LLAMA, layers, 3.0).status_code == 200
    exported = httpx.get(
        f"{server.url}/admin/personas/gguf-bound/export",
        params={"model": LLAMA, "format": "gguf"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    path = tmp_path / "gguf-bound.gguf"
    path.write_bytes(exported.content)
    strength = 3.0
    n_embd, buffer = load_control_vector(path, strength)  # as `--control-vector-scaled FILE 3.0`

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    steering = {block: strength * np.asarray(vector, np.float32) for block, vector in layers.items()}
    expected = hf_logits(hf, ids, steering)
    unsteered = hf_logits(hf, ids, {})

    assert n_embd == 64
    assert np.abs(llama_cpp_logits(llama_cpp_model, ids, None) - unsteered).max() < 1e-4
    steered = llama_cpp_logits(llama_cpp_model, ids, buffer)
    assert np.abs(steered - expected).max() < 1e-4
    assert np.abs(expected - unsteered).max() > 0.1  # and the persona does change the logits


def test_llama_cpp_refuses_block_0_which_is_why_the_export_does(tmp_path: Path) -> None:
    from persona_store.formats import gguf_file_bytes

    path = tmp_path / "block0.gguf"
    path.write_bytes(gguf_file_bytes({0: np.ones(64, np.float32)}, {}))
    with pytest.raises(RefusedByLlamaCpp, match="zero"):
        load_control_vector(path)
