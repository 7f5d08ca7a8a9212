"""Bake a stored persona into LoRA weights: the steps, their outputs, and the measured retention.

The teacher's answers come from the served model (any engine) steered by the persona; the student is
a fresh copy of the model's HF weights with a LoRA adapter (server.baking.distill). The prompts are
split by prompt: four in five teach, one in five validates (the adapter kept is the one with the
lowest KL on their answers) and measures the retention. Retention is the baked model's persona score
shift over the steered model's, both against the unsteered model (the answer-level persona score:
each answer read back on the unsteered base, projected on the persona's unit vectors), so it needs
no trait scorer of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from persona_store.records import PersonaRecord
from server.baking.distill import BakeSpec, DistillResult, distill
from server.baking.outputs import loss_curve_png, save_adapter, save_merged, write_provenance
from server.baking.trajectories import CONCURRENCY, sample_trajectories
from server.engine.base import Backend, ChatMessage, GenerationRequest, SamplingParams
from server.engine.llamacpp.convert import ConversionError, convert_hf_to_gguf, convert_lora_to_gguf
from server.engine.model_loading import load_causal_lm
from server.serving.low_priority import run_low_priority
from server.serving.monitoring import Monitor, persona_scores
from server.steering.plan import SteeringPlan

Progress = Callable[[float], None]
# Loads a model folder as a served backend (the engine registry's loader, given by the app).
BackendLoader = Callable[[Path, str], Awaitable[Backend]]
T = TypeVar("T")
VALIDATION_EVERY = 5  # one prompt in five validates
RETENTION_PROMPTS = 48  # of the validating prompts, how many the retention is measured on


@dataclass(frozen=True)
class BakeOrder:
    """What to bake and where to put it."""

    base_model: str  # the served id of the base
    source: Path  # its HF weights
    record: PersonaRecord
    strength: float
    prompts: Sequence[str]
    output: Path
    model_id: str  # the baked model's served name
    trajectories: int = 200
    max_tokens: int = 48
    temperature: float = 1.0
    spec: BakeSpec = field(default_factory=BakeSpec)
    # A server shares its engines and cores with chat while it bakes: it gives a bake fewer requests
    # in flight than an engine's batch rows, and trains on a few torch threads at a low CPU priority
    # (low_priority.py). None: train as a program alone on the machine (the CLI).
    requests_in_flight: int = CONCURRENCY
    training_threads: int | None = None

    def plan(self) -> SteeringPlan:
        vectors = {block: np.asarray(v, dtype=np.float32) for block, v in self.record.vectors.items()}
        return SteeringPlan(
            vectors=vectors, strength=self.strength, positions=self.record.info.default_positions
        )


@dataclass(frozen=True)
class BakeOutcome:
    model_id: str
    adapter: Path
    merged: Path
    loss_curve: Path
    gguf: dict[str, str]  # model and adapter paths, or why they were skipped
    provenance: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        paths = {"adapter": str(self.adapter), "merged": str(self.merged), "loss_curve": str(self.loss_curve)}
        return {"model_id": self.model_id, **paths, "gguf": self.gguf, "provenance": self.provenance}


def _split(prompts: Sequence[str]) -> tuple[list[str], list[str]]:
    validating = [p for i, p in enumerate(prompts) if i % VALIDATION_EVERY == 0]
    teaching = [p for i, p in enumerate(prompts) if i % VALIDATION_EVERY != 0]
    if not teaching or not validating:
        raise ValueError(f"baking needs at least 2 prompts, got {len(prompts)}")
    return teaching, validating


def _load_student(source: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    return load_causal_lm(source, dtype=torch.float32), tokenizer


async def _answers(
    backend: Backend, prompts: Sequence[str], plan: SteeringPlan | None, order: BakeOrder
) -> list[tuple[GenerationRequest, list[int]]]:
    async def one(index: int, prompt: str) -> tuple[GenerationRequest, list[int]]:
        seed = order.spec.seed + 7919 * (index + 1)
        sampling = SamplingParams(
            max_tokens=order.max_tokens, temperature=order.temperature, seed=seed, clamp_to_context=True
        )
        request = GenerationRequest(messages=[ChatMessage("user", prompt)], sampling=sampling, steering=plan)
        async with gate:
            ids = [token async for chunk in backend.generate(request) for token in chunk.token_ids]
        return request, ids

    gate = asyncio.Semaphore(order.requests_in_flight)
    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def persona_shift(
    base: Backend, answerer: Backend, prompts: Sequence[str], plan: SteeringPlan | None, order: BakeOrder
) -> float:
    """Mean persona score of ``answerer``'s answers (steered by ``plan``), read back on ``base``."""
    monitor = Monitor(
        "persona",
        {b: v / np.linalg.norm(v) for b, v in order.record.vectors.items() if np.linalg.norm(v) > 0},
    )
    blocks = 1 + max(monitor.directions)
    scores = []
    for request, ids in await _answers(answerer, prompts, plan, order):
        if ids:
            unsteered = GenerationRequest(messages=request.messages, sampling=request.sampling)
            means = await base.response_activations(unsteered, ids, blocks)
            scores.append(persona_scores(means, [monitor])["persona"])
    return float(np.mean(scores)) if scores else 0.0


async def _train(base: Backend, order: BakeOrder, progress: Progress) -> tuple[DistillResult, Any, list[str]]:
    teaching, validating = _split(order.prompts)
    model, tokenizer = await asyncio.to_thread(_load_student, order.source)
    plan = order.plan()
    sampling = {"max_tokens": order.max_tokens, "temperature": order.temperature}
    trajectories = await sample_trajectories(
        base,
        tokenizer,
        plan,
        teaching,
        order.trajectories,
        **sampling,
        seed=order.spec.seed,
        progress=lambda f: progress(0.2 * f),
        concurrency=order.requests_in_flight,
    )
    held_out = await sample_trajectories(
        base,
        tokenizer,
        plan,
        validating,
        max(order.trajectories // 4, 4),
        **sampling,
        seed=order.spec.seed + 1_000_003,
        concurrency=order.requests_in_flight,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    training = (model, plan, trajectories, order.spec, pad, held_out, lambda f: progress(0.2 + 0.6 * f))
    if order.training_threads is None:
        result = await asyncio.to_thread(distill, *training)
    else:
        result = await run_low_priority(order.training_threads, distill, *training)
    return result, tokenizer, validating


def _save_gguf(source: Path, adapter: Path, merged: Path, folder: Path) -> dict[str, str]:
    """The merged model as a GGUF, and the adapter as a llama.cpp LoRA of the base's GGUF (both F32,
    by our converter); an architecture it does not know is noted, not an error."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model = convert_hf_to_gguf(merged, folder / "model.gguf")
        lora = convert_lora_to_gguf(adapter, source, folder / "adapter.gguf")
    except ConversionError as exc:
        return {"skipped": str(exc)}
    return {"model": str(model), "adapter": str(lora)}


def _provenance(order: BakeOrder, result: DistillResult, seconds: float) -> dict[str, Any]:
    info = order.record.info
    return {
        "kind": "baked",
        "base_model": order.base_model,
        "persona": info.name,
        "persona_version": info.version,
        "strength": order.strength,
        "positions": str(info.default_positions),
        **{k: v for k, v in asdict(order.spec).items()},
        "lora_alpha": order.spec.lora_alpha,
        "target_modules": list(result.targets),
        "trajectories": order.trajectories,
        "best_step": result.best_step,
        "final_train_kl": result.losses[-1] if result.losses else None,
        "validation_kl": [[step, kl] for step, kl in result.validation],
        "seconds": round(seconds, 1),
    }


def _write_outputs(
    order: BakeOrder, result: DistillResult, tokenizer: Any, provenance: dict[str, Any]
) -> tuple[Path, Path, Path, dict[str, str]]:
    """The adapter, the loss curve, the merged model and the GGUFs, into the order's folder."""
    order.output.mkdir(parents=True, exist_ok=True)
    adapter, merged = order.output / "adapter", order.output / "merged"
    save_adapter(result.model, adapter, provenance)
    curve = order.output / "loss_curve.png"
    curve.write_bytes(
        loss_curve_png(result.losses, f"{order.record.info.name} baked into {order.base_model}")
    )
    save_merged(result.model, tokenizer, merged, provenance)
    gguf = _save_gguf(order.source, adapter, merged, order.output / "gguf")
    return adapter, merged, curve, gguf


async def _to_the_end(running: asyncio.Future[T]) -> T:
    """Await ``running`` (work in a thread, which cannot be stopped); when the caller is cancelled
    meanwhile, still wait for it to end, so that clean-up after it finds every file it wrote."""
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait([running])
        raise


async def _load_baked(load: BackendLoader, merged: Path, model_id: str) -> Backend:
    loading = asyncio.ensure_future(load(merged, model_id))
    try:
        return await _to_the_end(loading)
    except asyncio.CancelledError:
        if not loading.cancelled() and loading.exception() is None:
            await loading.result().close()  # loaded for a bake that was cancelled meanwhile
        raise


async def bake_persona(
    base: Backend, order: BakeOrder, load: BackendLoader, progress: Progress
) -> tuple[BakeOutcome, Backend]:
    """Sample, distil, write the adapter and the merged model, measure retention on the validating
    prompts; returns the outcome and the baked model loaded as a backend (to serve or to close)."""
    started = time.monotonic()
    result, tokenizer, validating = await _train(base, order, progress)
    provenance = _provenance(order, result, time.monotonic() - started)
    writing = asyncio.ensure_future(asyncio.to_thread(_write_outputs, order, result, tokenizer, provenance))
    adapter, merged, curve, gguf = await _to_the_end(writing)
    progress(0.85)
    baked = await _load_baked(load, merged, order.model_id)
    try:
        provenance["retention"] = await _retention(base, baked, validating[:RETENTION_PROMPTS], order)
        for folder in (adapter, merged):
            write_provenance(folder, provenance)
        progress(1.0)
    except BaseException:  # failed or cancelled: the baked engine is nobody's to close but ours
        await baked.close()
        raise
    return BakeOutcome(order.model_id, adapter, merged, curve, gguf, provenance), baked


async def _retention(
    base: Backend, baked: Backend, prompts: Sequence[str], order: BakeOrder
) -> dict[str, Any]:
    """How much of the steered model's persona score shift the baked model keeps, unsteered."""
    unsteered = await persona_shift(base, base, prompts, None, order)
    steered = await persona_shift(base, base, prompts, order.plan(), order)
    distilled = await persona_shift(base, baked, prompts, None, order)
    shift = steered - unsteered
    return {
        "prompts": len(prompts),
        "unsteered_score": unsteered,
        "steered_score": steered,
        "baked_score": distilled,
        "retained": (distilled - unsteered) / shift if shift else None,
    }
