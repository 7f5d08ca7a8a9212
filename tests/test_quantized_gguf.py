"""Quantized GGUF files, as users run them, steer as the F32 file does (issue 31, item 6).

demo-llama is written to GGUF F32 (server/gguf/model.py) and quantized by llama.cpp's own quantizer
(``llama_model_quantize``) to Q8_0 and Q4_K_M; the demo model's rows (hidden 128) are not multiples of
256, so Q4_K_M's k-quant tensors fall back to Q5_0/Q8_0 as llama.cpp decides, as they would for any
such model. Each file answers held-out questions greedily, unsteered and steered per request by the
demo personas pirate (blocks 1-2 of its 0-2: llama.cpp cannot steer block 0) and silly (block 1),
one request at a time (each takes a control-vector lane) and all at once (mixed personas: the per-row
lane). Then:
- the persona's reading of the answers (the mean projection of the unsteered read-back on the
  persona's unit vectors, what ``persona_scores`` reports) is within READING_TOLERANCE of the persona's
  shift (steered minus unsteered reading on the F32 file) of the F32 file's reading;
- the trait rate of the steered answers (marker words) is within TRAIT_TOLERANCE of the F32 file's;
- the per-row lane answers what the control-vector lanes answer, on every file.
``python -m tests.test_quantized_gguf`` prints the readings and trait rates of each file.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from persona_store.records import PersonaDraft
from server.demo.corpus import held_out_questions
from server.demo.models import demo_model_dir, load_demo_personas
from server.demo.traits import trait_rate
from server.engine.base import ChatMessage, GenerationRequest, SamplingParams
from server.engine.llamacpp.backend import LlamaCppBackend
from server.gguf.model import convert_hf_to_gguf
from server.serving.monitoring import Monitor, monitored_blocks, persona_scores
from server.steering.plan import Positions, SteeringPlan

pytestmark = [pytest.mark.llama_cpp, pytest.mark.slow]

MODEL = "demo-llama"
PERSONAS = ("pirate", "silly")
QUANTIZATIONS = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
READING_TOLERANCE = 0.1  # of the persona's shift on the F32 file
TRAIT_TOLERANCE = 0.125  # one answer in eight
QUESTIONS = 8

Figures = dict[tuple[str, str], tuple[float, float]]  # (persona, condition) -> (reading, trait rate)


def steerable_personas() -> dict[str, PersonaDraft]:
    """The demo personas on the blocks a control vector reaches (from block 1)."""
    return {
        p.name: dataclasses.replace(p, vectors={b: v for b, v in p.vectors.items() if b >= 1})
        for p in load_demo_personas(MODEL)
        if p.name in PERSONAS
    }


def quantized_files(folder: Path) -> dict[str, Path]:
    files = {"f32": convert_hf_to_gguf(demo_model_dir(MODEL), folder / f"{MODEL}-f32.gguf")}
    for name, file_type in QUANTIZATIONS.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = file_type
        files[name] = folder / f"{MODEL}-{name}.gguf"
        code = llama_cpp.llama_model_quantize(
            str(files["f32"]).encode(), str(files[name]).encode(), ctypes.byref(params)
        )
        assert code == 0, f"llama.cpp could not quantize to {name}"
    return files


def request(question: str, persona: PersonaDraft | None = None) -> GenerationRequest:
    plan = None
    if persona is not None:
        vectors = {block: torch.from_numpy(vector) for block, vector in persona.vectors.items()}
        plan = SteeringPlan(vectors, persona.default_strength, Positions(persona.default_positions))
    sampling = SamplingParams(max_tokens=24, temperature=0.0)
    return GenerationRequest(messages=[ChatMessage("user", question)], sampling=sampling, steering=plan)


async def tokens(engine: LlamaCppBackend, asked: GenerationRequest) -> list[int]:
    return [token for chunk in [c async for c in engine.generate(asked)] for token in chunk.token_ids]


async def reading(engine: LlamaCppBackend, question: str, answer: list[int], persona: PersonaDraft) -> float:
    """The persona's score of the answer, as the server reports it (``persona_scores``)."""
    monitor = Monitor(persona.name, {b: v / np.linalg.norm(v) for b, v in persona.vectors.items()})
    means = await engine.response_activations(
        request(question), answer, num_blocks=monitored_blocks([monitor])
    )
    return persona_scores(means, [monitor])[persona.name]


async def measure(path: Path) -> tuple[Figures, bool]:
    """Readings and trait rates of one file's answers; and whether the per-row lane (everything at
    once) answered what the control-vector lanes (one request at a time) did."""
    engine = LlamaCppBackend.load(path, contexts=2, sequences_per_context=4, kv_type="f32")
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir(MODEL))
    personas, questions = steerable_personas(), held_out_questions()[:QUESTIONS]
    asked = [(name, condition, q) for name in PERSONAS for condition in ("none", name) for q in questions]
    requests = [request(q, personas[c] if c != "none" else None) for _, c, q in asked]
    try:
        alone = [await tokens(engine, r) for r in requests]
        together = await asyncio.gather(*(tokens(engine, r) for r in requests))
        figures: Figures = {}
        for name in PERSONAS:
            for condition in ("none", name):
                rows = [i for i, (n, c, _) in enumerate(asked) if (n, c) == (name, condition)]
                readings = [await reading(engine, asked[i][2], alone[i], personas[name]) for i in rows]
                texts = [tokenizer.decode(alone[i], skip_special_tokens=True) for i in rows]
                figures[(name, condition)] = (float(np.mean(readings)), trait_rate(texts, name))
        return figures, list(together) == alone
    finally:
        await engine.close()


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Figures, bool]]]:
    files = quantized_files(tmp_path_factory.mktemp("quantized"))
    yield {name: asyncio.run(measure(path)) for name, path in files.items()}


@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
def test_a_quantized_file_steers_as_the_f32_file(
    measured: dict[str, tuple[Figures, bool]], quantization: str
) -> None:
    exact, _ = measured["f32"]
    figures, lanes_agree = measured[quantization]
    assert lanes_agree, "the per-row lane answered otherwise than the control-vector lanes"
    for name in PERSONAS:
        shift = exact[(name, name)][0] - exact[(name, "none")][0]
        assert shift > 0.5, f"{name} must move its own reading on the F32 file"
        for condition in ("none", name):
            got, want = figures[(name, condition)], exact[(name, condition)]
            assert abs(got[0] - want[0]) <= READING_TOLERANCE * shift, (name, condition, got, want)
            assert abs(got[1] - want[1]) <= TRAIT_TOLERANCE, (name, condition, got, want)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for name, path in quantized_files(Path(folder)).items():
            figures, lanes_agree = asyncio.run(measure(path))
            for (persona, condition), (value, rate) in figures.items():
                print(f"| {name} | {persona} | {condition} | {value:.3f} | {rate:.3f} | {lanes_agree} |")
