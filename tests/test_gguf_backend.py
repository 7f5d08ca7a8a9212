"""The GGUF backend steers exactly like the HF backend on the same weights; lanes serve concurrently.

The converter writes llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, phi3, olmo2, granite and gpt_oss,
and llama.cpp's logits equal transformers' within 1e-4 on each tiny model (GPT-OSS's with a sliding
window shorter than its prompts), unsteered and steered at each block 1..N-1; every one of those
graphs names block N's output ``l_out-N``, after its control vector, which is where the engine reads
and steers it. What is refused, and why:
- gemma2 and gemma3_text (``NOT_CONVERTIBLE``): llama.cpp's CPU kernel for the GELU of Gemma's MLP
  reads a table of float16 values (``GGML_GELU_FP16``), so its logits differ from transformers' by
  about 1e-3 on the same weights. Written anyway (their layout is known: RMSNorm weights + 1, the
  softcaps, the sliding window and local RoPE base), they equal transformers' once its MLP reads that
  table, up to inputs that round to the neighbouring float16 entry.
- a qwen3_moe model with ``norm_topk_prob`` false (the tiny default): llama.cpp's Qwen3-MoE always
  renormalises the chosen experts' weights. Its test model is the tiny one with it true.
- a Gemma whose ``query_pre_attn_scalar`` is not the one llama.cpp derives from the shape, or a Gemma 2
  whose output is not its embedding (llama.cpp's Gemma 2 reads no output tensor).
transformers' sdpa attention leaves out Gemma 2's attention softcapping: compare it with eager.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.demo.models import demo_model_dir
from server.engine.base import ChatMessage, EngineError, GenerationRequest, SamplingParams, TokenChunk
from server.engine.hf.backend import HFBackend
from server.engine.llamacpp.backend import LlamaCppBackend
from server.engine.llamacpp.lane import Lane
from server.engine.llamacpp.steering import steering_buffer
from server.gguf import model as gguf_model
from server.gguf.model import NOT_CONVERTIBLE, ConversionError, convert_hf_to_gguf
from server.steering.errors import SteeringError
from server.steering.plan import Positions, SteeringPlan
from testkit.tiny_models import tiny_config
from tests.llama_cpp_reference import Float16TableGelu, exact_llama, hf_logits, llama_cpp_logits, tiny_variant

# Every test runs real llama.cpp.
pytestmark = [pytest.mark.llama_cpp, pytest.mark.slow]  # llama.cpp conversions and loads, seconds a test

QUESTIONS = ["where is the treasure", "tell me of the sea", "good morning captain", "a storm comes"]


def chat(question: str, plan: SteeringPlan | None = None, max_tokens: int = 16) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(messages=[ChatMessage("user", question)], sampling=sampling, steering=plan)


async def tokens(backend: HFBackend | LlamaCppBackend, request: GenerationRequest) -> list[int]:
    return [t for chunk in [c async for c in backend.generate(request)] for t in chunk.token_ids]


def persona(seed: int, blocks: list[int], hidden: int, strength: float, positions: Positions) -> SteeringPlan:
    generator = torch.Generator().manual_seed(seed)
    vectors = {block: torch.randn(hidden, generator=generator) for block in blocks}
    return SteeringPlan(vectors, strength=strength, positions=positions)


@pytest.fixture(scope="module")
def gguf_llama(llama_gguf: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend.load(
        llama_gguf, model_id="tiny-llama-gguf", contexts=2, sequences_per_context=4, kv_type="f32"
    )
    yield backend
    asyncio.run(backend.close())


@pytest.fixture(scope="module")
def hf_llama(llama_dir: Path) -> Iterator[HFBackend]:
    backend = HFBackend.load(llama_dir, model_id="tiny-llama")
    yield backend
    asyncio.run(backend.close())


# Every model type the converter writes; a mixture has four experts, two per token.
CONVERTED = [
    "llama",
    "qwen2",
    "phi3",
    "mistral",
    "qwen3",
    "granite",
    "olmo2",
    "mixtral",
    "qwen3_moe",
    "gpt_oss",
]
# What a tiny model of a type changes: to be one llama.cpp computes as transformers does (the refusals
# below show why; Gemma's queries scaled by 1/sqrt(head_dim)), or
# to put a detail to work (GPT-OSS's sliding window, 1,024 positions in testkit's model).
VARIANTS: dict[str, dict[str, object]] = {
    "qwen3_moe": {"norm_topk_prob": True},
    "gpt_oss": {"sliding_window": 8},  # shorter than the prompts: its sliding layers see part of them
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3_text": {"query_pre_attn_scalar": 16},
}


@pytest.fixture(scope="module")
def model_dir_of(
    llama_dir: Path,
    qwen_dir: Path,
    tiny_model_dir: Callable[[str], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], Path]:
    """The tiny model of a type that the conversion tests use (its variant, where it has one)."""
    # The phi3 model's directory name holds "phi3", which llama.cpp would read as Microsoft's Phi-3.
    built: dict[str, Path] = {"llama": llama_dir, "qwen2": qwen_dir}

    def model_dir(architecture: str) -> Path:
        if architecture not in built:
            fields = VARIANTS.get(architecture)
            built[architecture] = (
                tiny_variant(tmp_path_factory.mktemp(architecture), architecture, fields)
                if fields
                else tiny_model_dir(architecture)
            )
        return built[architecture]

    return model_dir


@pytest.mark.parametrize("architecture", CONVERTED)
def test_logits_equal_hf_unsteered_and_steered_at_each_block(
    architecture: str, model_dir_of: Callable[[str], Path], tmp_path: Path
) -> None:
    model_dir = model_dir_of(architecture)
    gguf = convert_hf_to_gguf(model_dir, tmp_path / f"{architecture}.gguf")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hidden, blocks = hf.config.hidden_size, hf.config.num_hidden_layers
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    model = exact_llama(gguf)
    unsteered = hf_logits(hf, ids, {})
    assert np.abs(llama_cpp_logits(model, ids, None) - unsteered).max() < 1e-4
    for block in range(1, blocks):
        plan = persona(block, [block], hidden, strength=4.0, positions=Positions.ALL)
        expected = hf_logits(hf, ids, plan.deltas)
        steered = llama_cpp_logits(model, ids, steering_buffer(plan, hidden, blocks))
        assert np.abs(steered - expected).max() < 1e-4, f"block {block}"
        assert np.abs(expected - unsteered).max() > 0.05, "the vector must change the logits"


@pytest.mark.parametrize("architecture", CONVERTED[4:])  # the types after Phi-3 and Mistral
async def test_the_per_row_lane_reads_and_steers_each_types_block_outputs_as_hf(
    architecture: str, model_dir_of: Callable[[str], Path], tmp_path: Path
) -> None:
    """The engine reads and steers block N at llama.cpp's ``l_out-N``: each type's graph names its
    block outputs so (after the control vector), and the per-row lane steers them as the HF engine."""
    model_dir = model_dir_of(architecture)
    path = convert_hf_to_gguf(model_dir, tmp_path / f"{architecture}.gguf")
    gguf = LlamaCppBackend.load(path, contexts=0, kv_type="f32")  # every request on the per-row lane
    hf = HFBackend.load(model_dir, model_id=architecture)
    try:
        texts = [QUESTIONS[0], QUESTIONS[1]]
        assert np.abs(await gguf.text_activations(texts) - await hf.text_activations(texts)).max() < 1e-4
        blocks = [[1], [2], [1, 2]]
        plans = [persona(80 + i, on, hf.info.hidden_size, 4.0, Positions.ALL) for i, on in enumerate(blocks)]
        requests = [chat(QUESTIONS[i], plan) for i, plan in enumerate(plans)]
        expected = [await tokens(hf, request) for request in requests]
        assert list(await asyncio.gather(*(tokens(gguf, request) for request in requests))) == expected
    finally:
        await gguf.close()
        await hf.close()


@pytest.mark.parametrize(
    ("architecture", "reason"), [*dict.fromkeys(NOT_CONVERTIBLE, "float16 table").items()]
)
def test_a_type_llama_cpp_computes_otherwise_is_refused_with_the_reason(
    architecture: str, reason: str, tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    with pytest.raises(ConversionError, match=reason):
        convert_hf_to_gguf(tiny_model_dir(architecture), tmp_path / "refused.gguf")


def test_a_model_llama_cpp_would_route_scale_or_tie_otherwise_is_refused(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConversionError, match="norm_topk_prob is false"):
        convert_hf_to_gguf(tiny_model_dir("qwen3_moe"), tmp_path / "refused.gguf")
    monkeypatch.setattr(gguf_model, "NOT_CONVERTIBLE", {})  # what Gemma would meet next
    with pytest.raises(ConversionError, match="query_pre_attn_scalar is 256"):
        convert_hf_to_gguf(tiny_model_dir("gemma3_text"), tmp_path / "refused.gguf")
    untied_fields = {"query_pre_attn_scalar": 16, "tie_word_embeddings": False}
    untied = tiny_variant(tmp_path / "untied", "gemma2", untied_fields)
    with pytest.raises(ConversionError, match="reads no output tensor"):
        convert_hf_to_gguf(untied, tmp_path / "refused.gguf")


@pytest.mark.parametrize("architecture", ["gemma2", "gemma3_text"])  # gemma3's text stack is gemma3_text
def test_gemma_differs_from_transformers_by_llama_cpp_float16_gelu_alone(
    architecture: str, model_dir_of: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why Gemma is refused: written anyway, llama.cpp's logits differ from transformers' beyond 1e-4,
    and equal them once transformers' MLP computes GELU from llama.cpp's float16 table."""
    monkeypatch.setattr(gguf_model, "NOT_CONVERTIBLE", {})
    model_dir = model_dir_of(architecture)
    path = convert_hf_to_gguf(model_dir, tmp_path / f"{architecture}.gguf")
    # Eager attention: transformers' sdpa path leaves out Gemma 2's attention softcapping.
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    ids = AutoTokenizer.from_pretrained(model_dir)(" ".join(QUESTIONS))["input_ids"]
    llama = llama_cpp_logits(exact_llama(path), ids, None)
    difference = np.abs(llama - hf_logits(hf, ids, {})).max()
    for layer in hf.model.layers:
        layer.mlp.act_fn = Float16TableGelu()
    emulated = np.abs(llama - hf_logits(hf, ids, {})).max()
    # Not to zero: an input one float32 rounding away from llama.cpp's may round to the next float16
    # and take the neighbouring table entry (1e-3 apart), so what is left is that, not a layout error.
    assert difference > 1e-4 and emulated < difference / 3, (difference, emulated)


@pytest.mark.parametrize("architecture", CONVERTED)
def test_a_model_whose_output_is_its_embedding_converts_loads_and_equals_hf(
    architecture: str, tmp_path: Path
) -> None:
    """Tied output and embedding (every demo model, Gemma, small Qwens): llama.cpp reuses the embedding
    where the family lets it and needs an output tensor where it does not (GPT-OSS, which before
    converted and then failed to load)."""
    fields = {**VARIANTS.get(architecture, {}), "tie_word_embeddings": True}
    model_dir = tiny_variant(tmp_path / architecture, architecture, fields)
    path = convert_hf_to_gguf(model_dir, tmp_path / f"{architecture}.gguf")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(model_dir)(" ".join(QUESTIONS))["input_ids"]
    assert np.abs(llama_cpp_logits(exact_llama(path), ids, None) - hf_logits(hf, ids, {})).max() < 1e-4


def test_gpt_oss_as_released_differs_by_llama_cpp_rounding_yarn_alone(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Released GPT-OSS leaves YaRN's correction range unrounded (``truncate`` false), which llama.cpp
    cannot follow: converted with a warning, its logits differ from transformers' beyond 1e-4, while
    the rounded model (testkit's, the conversion tests') gives them within 1e-5. When llama.cpp learns
    the unrounded range, this test fails and the warning can go."""
    rope = {**tiny_config("gpt_oss", 400).rope_parameters, "truncate": False}
    released = tiny_variant(tmp_path / "released", "gpt_oss", {"rope_parameters": rope})
    ids = AutoTokenizer.from_pretrained(released)(" ".join(QUESTIONS))["input_ids"]
    gaps = []
    for model_dir in (released, tiny_model_dir("gpt_oss")):
        with caplog.at_level(logging.WARNING, logger="server.gguf.model"):
            path = convert_hf_to_gguf(model_dir, tmp_path / f"{model_dir.name}.gguf")
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        gaps.append(np.abs(llama_cpp_logits(exact_llama(path), ids, None) - hf_logits(hf, ids, {})).max())
    assert gaps[0] > 1e-3 and gaps[1] < 1e-5, gaps
    assert [r.message for r in caplog.records].count(
        "YaRN with truncate=false: llama.cpp rounds the correction range; logits will differ"
    ) == 1


@pytest.mark.parametrize("positions", list(Positions))
async def test_greedy_tokens_equal_hf_for_each_position_rule(
    gguf_llama: LlamaCppBackend, hf_llama: HFBackend, positions: Positions
) -> None:
    for index, blocks in enumerate([[1], [2], [1, 2]]):
        plan = persona(10 + index, blocks, 64, strength=5.0, positions=positions)
        request = chat(QUESTIONS[index], plan)
        assert await tokens(gguf_llama, request) == await tokens(hf_llama, request)
    assert await tokens(gguf_llama, chat(QUESTIONS[3])) == await tokens(hf_llama, chat(QUESTIONS[3]))


@pytest.mark.parametrize("positions", list(Positions))
async def test_a_persona_alone_in_a_control_vector_lane_joins_the_per_row_lane_when_another_arrives(
    gguf_llama: LlamaCppBackend, positions: Positions
) -> None:
    """Each busy lane costs a llama_decode per step: the first request of a burst, which found nothing
    running and took a control-vector lane, moves with its cache cells into the per-row lane once a
    request with another persona starts there, and answers what it answers alone."""
    first = chat(QUESTIONS[0], persona(30, [1, 2], 64, 1.0, positions), max_tokens=24)
    second = chat(QUESTIONS[1], persona(31, [2], 64, 1.0, positions), max_tokens=24)
    solo = [await tokens(gguf_llama, first), await tokens(gguf_llama, second)]
    scheduler = gguf_llama.scheduler
    stream: AsyncIterator[TokenChunk] = gguf_llama.generate(first)
    answer: list[int] = []
    while len(answer) < 8:  # its cells hold the prompt and these tokens when it moves
        answer += (await anext(stream)).token_ids
    assert scheduler.rows_per_lane().count((False, 1)) == 1  # alone: a control-vector lane
    joining = asyncio.ensure_future(tokens(gguf_llama, second))
    for _ in range(200):
        if (True, 2) in scheduler.rows_per_lane():
            break
        await asyncio.sleep(0.005)
    assert scheduler.rows_per_lane().count((True, 2)) == 1, scheduler.rows_per_lane()
    answer += [token async for chunk in stream for token in chunk.token_ids]
    assert [answer, await joining] == solo


async def test_a_request_whose_cells_find_no_room_in_the_per_row_lane_ends_where_it_is(
    gguf_llama: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-row lane may hold no run of free cells long enough for a moving request's cache: it
    stays in its control-vector lane, is not tried again every step, and answers as alone."""
    tried: list[int] = []

    def no_room(lane: Lane, sequence: int, target: Lane, target_sequence: int) -> bool:
        tried.append(sequence)
        return False

    first = chat(QUESTIONS[0], persona(30, [1, 2], 64, 1.0, Positions.ALL), max_tokens=24)
    second = chat(QUESTIONS[1], persona(31, [2], 64, 1.0, Positions.ALL), max_tokens=24)
    solo = [await tokens(gguf_llama, first), await tokens(gguf_llama, second)]
    monkeypatch.setattr(Lane, "copy_cells", no_room)
    scheduler = gguf_llama.scheduler
    stream: AsyncIterator[TokenChunk] = gguf_llama.generate(first)
    answer = list((await anext(stream)).token_ids)
    joining = asyncio.ensure_future(tokens(gguf_llama, second))
    for _ in range(200):
        if (True, 1) in scheduler.rows_per_lane():
            break
        await asyncio.sleep(0.005)
    assert sorted(scheduler.rows_per_lane()) == [(False, 0), (False, 1), (True, 1)]
    answer += [token async for chunk in stream for token in chunk.token_ids]
    assert [answer, await joining] == solo
    assert len(tried) == 1


async def test_a_cancelled_request_frees_its_lane(gguf_llama: LlamaCppBackend) -> None:
    scheduler = gguf_llama.scheduler
    stream: AsyncIterator[TokenChunk] = gguf_llama.generate(chat(QUESTIONS[1], max_tokens=500))
    for _ in range(3):
        await anext(stream)
    assert scheduler.num_running == 1 and scheduler.lanes_in_use == 1
    await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(500):
        if scheduler.num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert scheduler.num_running == 0 and scheduler.lanes_in_use == 0


async def test_block_0_is_refused_clearly(gguf_llama: LlamaCppBackend) -> None:
    assert gguf_llama.info.steerable_layers == (1, 2)
    with pytest.raises(SteeringError, match="cannot steer block 0"):
        await tokens(gguf_llama, chat(QUESTIONS[0], persona(1, [0, 1], 64, 1.0, Positions.ALL)))


async def test_response_nll_equals_hf(gguf_llama: LlamaCppBackend, hf_llama: HFBackend) -> None:
    request = chat(QUESTIONS[2])
    response = await tokens(hf_llama, request)
    gguf_nll, count = await gguf_llama.response_nll(request, response)
    hf_nll, _ = await hf_llama.response_nll(request, response)
    assert count == len(response) and gguf_nll == pytest.approx(hf_nll, rel=1e-4)


async def test_the_demo_llama_as_gguf_answers_like_the_hf_demo_with_its_persona(tmp_path: Path) -> None:
    from server.demo.models import load_demo_personas

    source = demo_model_dir("demo-llama")
    gguf = LlamaCppBackend.load(convert_hf_to_gguf(source, tmp_path / "demo-llama.gguf"), kv_type="f32")
    hf = HFBackend.load(source)
    compared = []
    try:
        for draft in load_demo_personas("demo-llama"):
            vectors = {block: v for block, v in draft.vectors.items() if block > 0}  # llama.cpp: blocks 1..
            if not vectors:
                continue
            plan = SteeringPlan(vectors, draft.default_strength, Positions(draft.default_positions))
            request = chat("what do you think of the harbor?", plan, max_tokens=24)
            assert await tokens(gguf, request) == await tokens(hf, request)
            compared.append(draft.name)
    finally:
        await gguf.close()
        await hf.close()
    # Of the demo llama's three personas, one steers block 0 only, which llama.cpp cannot steer.
    assert len(compared) >= 2, f"only {compared} could be compared"


async def test_mixed_personas_share_the_per_row_lane_and_equal_hf(
    gguf_llama: LlamaCppBackend, hf_llama: HFBackend
) -> None:
    plans = [persona(60 + i, [1, 2][: 1 + i % 2], 64, 4.0, list(Positions)[i % 3]) for i in range(6)]
    long_question = " ".join(QUESTIONS * 24)  # over 512 tokens: a prefill of two ubatches
    requests = [chat(QUESTIONS[i % 4], plan, max_tokens=20) for i, plan in enumerate(plans)]
    requests.append(chat(long_question, plans[0], max_tokens=8))
    expected = [await tokens(hf_llama, request) for request in requests]

    busiest_per_row = 0

    async def watch() -> None:
        nonlocal busiest_per_row
        while True:
            rows = [count for per_row, count in gguf_llama.scheduler.rows_per_lane() if per_row]
            busiest_per_row = max(busiest_per_row, *rows)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    together = await asyncio.gather(*(tokens(gguf_llama, request) for request in requests))
    watcher.cancel()
    assert list(together) == expected
    assert busiest_per_row >= 3  # different personas were decoded in one batch


async def test_the_per_row_lane_steers_the_positions_each_rule_names(
    llama_gguf: Path, hf_llama: HFBackend
) -> None:
    # No control-vector lane: every request, alone or batched, goes through the per-row lane.
    per_row_only = LlamaCppBackend.load(llama_gguf, contexts=0, kv_type="f32")
    try:
        requests = [chat(QUESTIONS[0], persona(70, [1, 2], 64, 2.0, positions)) for positions in Positions]
        expected = [await tokens(hf_llama, request) for request in requests]
        assert len({tuple(e) for e in expected}) == 3, "here each rule must steer to other tokens"
        assert [await tokens(per_row_only, request) for request in requests] == expected
        together = await asyncio.gather(*(tokens(per_row_only, request) for request in requests))
        assert list(together) == expected
    finally:
        await per_row_only.close()


def test_the_convert_command_writes_a_loadable_gguf_and_refuses_other_architectures(
    llama_dir: Path, tiny_model_dir: object, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    written = CliRunner().invoke(app, ["convert", str(llama_dir), str(tmp_path / "out.gguf")])
    assert written.exit_code == 0 and "wrote" in written.output
    backend = LlamaCppBackend.load(tmp_path / "out.gguf", contexts=1, mixed_sequences=0)
    assert (backend.info.num_layers, backend.info.hidden_size, backend.info.backend) == (3, 64, "llamacpp")
    asyncio.run(backend.close())
    gpt2 = tiny_model_dir("gpt2")  # type: ignore[operator]
    refused = CliRunner().invoke(app, ["convert", str(gpt2), str(tmp_path / "gpt2.gguf")])
    assert refused.exit_code == 1 and "cannot convert model type 'gpt2'" in refused.output


async def test_block_outputs_read_through_the_callback_equal_hf(
    gguf_llama: LlamaCppBackend, hf_llama: HFBackend
) -> None:
    texts = ["where is the treasure, captain?", " ".join(QUESTIONS * 24)]  # one over 512 tokens
    gguf = await gguf_llama.text_activations(texts)
    hf = await hf_llama.text_activations(texts)
    assert gguf.shape == hf.shape == (2, 2, 3, 64)
    assert np.abs(gguf - hf).max() < 1e-4
    request = chat(QUESTIONS[1])
    response = await tokens(hf_llama, request)
    every_block = await gguf_llama.response_activations(request, response)
    assert np.abs(every_block - await hf_llama.response_activations(request, response)).max() < 1e-4
    # Read up to block 1 only: the graph stops there and the blocks read are the same.
    first_two = await gguf_llama.response_activations(request, response, num_blocks=2)
    assert first_two.shape == (2, 64) and np.abs(first_two - every_block[:2]).max() < 1e-6
    long_answer = [
        5 + i % 90 for i in range(600)
    ]  # over one 512-token batch: the second reads the first's cache
    whole = await gguf_llama.response_activations(request, long_answer)
    stopped = await gguf_llama.response_activations(request, long_answer, num_blocks=2)
    assert np.abs(stopped - whole[:2]).max() < 1e-6
    # The lane is whole again: generation after a stopped read-back is what it was.
    assert await tokens(gguf_llama, request) == response


def test_another_models_answer_is_read_as_the_hf_tokenizer_reads_it(
    gguf_llama: LlamaCppBackend, hf_llama: HFBackend
) -> None:
    """The generated mapping method reads a source model's answer through this model: the answer's
    text becomes the same response tokens on llama.cpp as on the HF checkpoint."""
    for text in ("the crew of the ship", " gold and a map", "storm"):
        assert gguf_llama.answer_ids(text) == hf_llama.answer_ids(text), text


async def test_unsteered_monitoring_is_read_while_generating_and_equals_the_hf_read_back(
    gguf_llama: LlamaCppBackend, hf_llama: HFBackend
) -> None:
    """With nothing steered up to the monitored blocks, the per-row lane reads them as the answer's
    tokens are fed back (the last chunk carries the means, as on the HF engine); a steered request
    is read back instead."""
    later = persona(4, [2], 64, 3.0, Positions.ALL)
    for plan, blocks, in_flight in ((None, 2, True), (later, 2, True), (later, 3, False)):
        sampling = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
        request = GenerationRequest(
            messages=[ChatMessage("user", QUESTIONS[2])],
            sampling=sampling,
            steering=plan,
            monitor_blocks=blocks,
        )
        chunks = [chunk async for chunk in gguf_llama.generate(request)]
        assert all(chunk.response_means is None for chunk in chunks[:-1])
        answer = [token for chunk in chunks for token in chunk.token_ids]
        assert len(answer) == 9 and answer == await tokens(
            hf_llama, dataclasses.replace(request, monitor_blocks=None)
        )
        means = chunks[-1].response_means
        if not in_flight:
            assert means is None
            continue
        assert means is not None and means.shape == (blocks, 64)
        read_back = await hf_llama.response_activations(request, answer, num_blocks=blocks)
        assert np.abs(means - read_back).max() < 1e-4


def test_a_gguf_of_an_architecture_llama_cpp_does_not_know_is_refused_naming_it(tmp_path: Path) -> None:
    """A clear error at load, naming the file's architecture, never a silent engine (issue 31, item 8)."""
    path = tmp_path / "unknown.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-arch")
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    gguf_model.write_file(writer)
    with pytest.raises(EngineError, match="architecture 'no-such-arch'"):
        LlamaCppBackend.load(path)
