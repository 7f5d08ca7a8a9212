"""Admin routes: create, read, delete, list, restore, import and export persona vectors; the jobs
(extraction, map fits, persona maps, bakes)."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Header, Path, Query, Response, UploadFile
from pydantic import FiniteFloat

from persona_store.mappings import MAPPING_ID_PATTERN
from persona_store.records import PERSONA_NAME_PATTERN
from server.admin.baked_models import BakeOptions
from server.admin.extraction import ExtractionSpec
from server.admin.extraction_prompts import check_extraction_fits
from server.admin.mapping_plots import calibration_png, diagnostics_png
from server.admin.persona_files import ImportOptions, VectorFormat
from server.admin.persona_mapping import MapTarget
from server.api.admin_requests import (
    BakeRequest,
    ExtractionRequest,
    MappingFitRequest,
    PersonaMapRequest,
    PersonaRestore,
    PersonaUpload,
)
from server.api.auth import require_admin
from server.api.errors import APIError
from server.api.openapi import binary, errors
from server.api.resources import (
    JobHandle,
    JobStatus,
    Mapping,
    MappingList,
    MappingSummary,
    ModelDeleted,
    Persona,
    PersonaList,
    PersonaWithVectors,
)
from server.api.services import ServicesDep
from server.serving.errors import RequestRejected
from server.serving.protocol.json_types import JSON_SAFE_INTEGER
from server.steering.plan import Positions

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], responses=errors(401, 403))
NameParam = Annotated[str, Path(pattern=PERSONA_NAME_PATTERN)]
# Checked by the mapping service (400 naming mapping_id); stated here for clients and fuzzers.
MappingIdParam = Annotated[str, Path(json_schema_extra={"pattern": MAPPING_ID_PATTERN})]
LAYER_LIST_PATTERN = r"^\s*\d{1,6}(\s*,\s*\d{1,6})*\s*$"


# If-Match carries the one version a write expects to replace, as an entity tag ("3", RFC 9110's
# form) or a bare number (3); 0 means "only if no version is current". Anything else, "*" and lists
# of tags included, is refused (400 naming the header) rather than read as no condition at all.
IF_MATCH_PATTERN = r'^([0-9]{1,18}|"[0-9]{1,18}")$'
IfMatch = Annotated[
    str | None,
    Header(
        description='The version the write expects to replace: "3" or 3 (0: only if the persona does '
        "not exist); a stale one is a 409 version_conflict.",
        json_schema_extra={"pattern": IF_MATCH_PATTERN},
    ),
]


def _expected_version(if_match: str | None) -> int | None:
    if if_match is None:
        return None
    if re.fullmatch(IF_MATCH_PATTERN, if_match) is None:
        raise RequestRejected(
            f'If-Match must be one persona version, as "3" or 3, got {if_match!r} ("*" and lists of '
            "versions are not supported)",
            param="If-Match",
        )
    return int(if_match.strip('"'))


@router.put("/personas/{name}", response_model=Persona, responses=errors(400, 404, 409, 413, 422, 503))
async def put_persona(
    name: NameParam, body: PersonaUpload, services: ServicesDep, if_match: IfMatch = None
) -> dict[str, Any]:
    info = await services.persona_admin.put(
        name=name,
        model=body.model,
        layers=body.layers,
        default_strength=body.default_strength,
        default_positions=body.default_positions,
        description=body.description,
        expected_version=_expected_version(if_match),
    )
    return info.to_dict()


@router.get("/personas/{name}", response_model=PersonaWithVectors, responses=errors(404, 422, 503))
async def get_persona(
    name: NameParam, model: Annotated[str, Query()], services: ServicesDep
) -> dict[str, Any]:
    return await services.persona_admin.get(name, model)


@router.delete("/personas/{name}", status_code=204, responses=errors(400, 404, 409, 422, 503))
async def delete_persona(
    name: NameParam,
    model: Annotated[str, Query()],
    services: ServicesDep,
    if_match: IfMatch = None,
) -> Response:
    await services.persona_admin.delete(name, model, expected_version=_expected_version(if_match))
    return Response(status_code=204)


@router.get("/personas/{name}/versions", response_model=PersonaList, responses=errors(404, 422, 503))
async def list_versions(
    name: NameParam, model: Annotated[str, Query()], services: ServicesDep
) -> dict[str, Any]:
    """The kept versions, newest first (a deleted persona's history stays, for restoring)."""
    kept = await services.persona_admin.versions(name, model)
    return {"object": "list", "data": [info.to_dict() for info in kept]}


@router.post(
    "/personas/{name}/restore", response_model=Persona, responses=errors(400, 404, 409, 413, 422, 503)
)
async def restore_persona(
    name: NameParam, body: PersonaRestore, services: ServicesDep, if_match: IfMatch = None
) -> dict[str, Any]:
    """Make a kept version current again, as a new version (versions never repeat)."""
    info = await services.persona_admin.restore(name, body.model, body.version, _expected_version(if_match))
    return info.to_dict()


@router.post(
    "/personas/{name}/import", response_model=Persona, responses=errors(400, 404, 409, 413, 422, 503)
)
async def import_persona(
    name: NameParam,
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="safetensors, GGUF control vector or persona_vectors .pt")],
    model: Annotated[str, Form(min_length=1)],  # an empty form field reads as none
    format: Annotated[VectorFormat | None, Form(description="Default: from the file name.")] = None,
    layers: Annotated[
        str | None,
        Form(pattern=LAYER_LIST_PATTERN, description="Comma-separated blocks to import (required for .pt)."),
    ] = None,
    default_strength: Annotated[FiniteFloat | None, Form()] = None,
    default_positions: Annotated[Positions | None, Form()] = None,
    description: Annotated[str | None, Form(max_length=4000)] = None,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    options = ImportOptions(
        model=model,
        format=format,
        layers=None if layers is None else [int(part) for part in layers.split(",")],
        default_strength=default_strength,
        default_positions=None if default_positions is None else default_positions.value,
        description=description,
        expected_version=_expected_version(if_match),
    )
    data = await file.read()
    info = await services.persona_files.import_file(name, data, file.filename or "", options)
    return info.to_dict()


@router.get(
    "/personas/{name}/export",
    response_class=Response,
    responses={**binary("application/octet-stream", "The vector file."), **errors(400, 404, 422, 503)},
)
async def export_persona(
    name: NameParam,
    services: ServicesDep,
    model: Annotated[str, Query()],
    format: Annotated[VectorFormat, Query()] = VectorFormat.SAFETENSORS,
    version: Annotated[int | None, Query(ge=1, le=JSON_SAFE_INTEGER)] = None,
) -> Response:
    exported = await services.persona_files.export_file(name, model, format, version)
    disposition = f'attachment; filename="{exported.filename}"'
    return Response(
        exported.content, media_type=format.media_type, headers={"Content-Disposition": disposition}
    )


@router.get("/personas", response_model=PersonaList, responses=errors(404, 503))
async def list_personas(services: ServicesDep, model: str | None = None) -> dict[str, Any]:
    return {"object": "list", "data": [info.to_dict() for info in await services.persona_admin.list(model)]}


@router.post(
    "/personas/{name}/extract",
    status_code=202,
    response_model=JobHandle,
    responses=errors(400, 404, 413, 422, 429),
)
async def extract_persona(name: NameParam, body: ExtractionRequest, services: ServicesDep) -> JobHandle:
    spec = ExtractionSpec(
        positive_prompts=body.positive_prompts,
        negative_prompts=body.negative_prompts,
        questions=body.questions,
        samples_per_question=body.samples_per_question,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        seed=body.seed,
    )
    await check_extraction_fits(services.registry, body.model, spec)
    job = services.persona_extraction.start(
        name, body.model, spec, body.layers, body.default_strength, body.description
    )
    return _handle(job)


@router.get("/jobs/{job_id}", response_model=JobStatus, responses=errors(404))
async def get_job(job_id: str, services: ServicesDep) -> dict[str, Any]:
    return services.jobs.get(job_id).to_dict()


@router.delete("/jobs/{job_id}", response_model=JobStatus, responses=errors(404))
async def cancel_job(job_id: str, services: ServicesDep) -> dict[str, Any]:
    """Cancel a queued or running job (a finished one is left as it ended)."""
    return services.jobs.cancel(job_id).to_dict()


@router.post(
    "/personas/{name}/bake",
    status_code=202,
    response_model=JobHandle,
    responses=errors(400, 404, 409, 413, 422, 429),
)
async def bake_persona(name: NameParam, body: BakeRequest, services: ServicesDep) -> JobHandle:
    """Distil the model steered by this persona into LoRA weights, then serve the result as a model
    (named in the job's result as model_id; default MODEL+PERSONA), as a background job."""
    options = BakeOptions(
        strength=body.strength,
        rank=body.rank,
        trajectories=body.trajectories,
        steps=body.steps,
        max_tokens=body.max_tokens,
        prompts=body.prompts,
        served_name=body.served_name,
        seed=body.seed,
    )
    return _handle(await services.persona_bakes.start(name, body.model, options))


@router.delete("/models/{model}", response_model=ModelDeleted, responses=errors(400, 404, 409))
async def delete_model(model: str, services: ServicesDep) -> ModelDeleted:
    """Stop serving a model baked on this server and delete its files (``<data-dir>/baked/<model>/``),
    as OpenAI deletes a fine-tuned model; a model with jobs running or queued on it is a 409."""
    await services.persona_bakes.delete(model)
    return ModelDeleted(id=model)


@router.post(
    "/mappings", status_code=202, response_model=JobHandle, responses=errors(400, 404, 413, 422, 429)
)
async def fit_mapping(body: MappingFitRequest, services: ServicesDep) -> JobHandle:
    """Fit a map from one served model to another on the same neutral texts, as a background job."""
    job = services.mapping_fits.start_fit(
        body.source_model, body.target_model, body.layers, body.texts, body.lambdas, body.folds, body.reduce
    )
    return _handle(job)


@router.get("/mappings", response_model=MappingList, responses=errors(503))
async def list_mappings(services: ServicesDep) -> MappingList:
    return MappingList(data=[_mapping_summary(info) for info in await services.mapping_fits.list()])


@router.get("/mappings/{mapping_id}", response_model=Mapping, responses=errors(400, 404, 503))
async def get_mapping(mapping_id: MappingIdParam, services: ServicesDep) -> dict[str, Any]:
    return (await services.mapping_fits.get(mapping_id)).to_dict()


@router.get(
    "/mappings/{mapping_id}/diagnostics.png",
    response_class=Response,
    responses={**binary("image/png", "The diagnostics plot."), **errors(400, 404, 503)},
)
async def mapping_diagnostics(mapping_id: MappingIdParam, services: ServicesDep) -> Response:
    """Held-out error per lambda and the singular values of each block's map, as a picture."""
    info = await services.mapping_fits.get(mapping_id)
    if info.metadata.get("method") != "ridge":
        raise APIError(
            404,
            f"mapping {mapping_id} is a {info.metadata.get('method')} map: no CV diagnostics",
            "invalid_request_error",
        )
    title = f"{info.source_model} -> {info.target_model} ({mapping_id})"
    png = await asyncio.to_thread(diagnostics_png, info.metadata, title)
    return Response(png, media_type="image/png")


@router.delete("/mappings/{mapping_id}", status_code=204, responses=errors(400, 404, 503))
async def delete_mapping(mapping_id: MappingIdParam, services: ServicesDep) -> Response:
    await services.mapping_fits.delete(mapping_id)
    return Response(status_code=204)


@router.post(
    "/personas/{name}/map",
    status_code=202,
    response_model=JobHandle,
    responses=errors(400, 404, 409, 413, 422, 429, 503),
)
async def map_persona(name: NameParam, body: PersonaMapRequest, services: ServicesDep) -> JobHandle:
    """Carry a persona from source_model to target_model and store it there, under target_name, as a
    background job (its result: the stored persona, and whether the source changed meanwhile).

    A persona of that name on the target that was not itself mapped from this persona and source
    model is kept (409) unless replace is true.
    """
    target = MapTarget(
        body.target_model, name if body.target_name is None else body.target_name, body.replace
    )
    return _handle(
        await services.persona_mapper.start(name, body.source_model, target, body.mapping_id, body.method)
    )


@router.get(
    "/personas/{name}/calibration.png",
    response_class=Response,
    responses={**binary("image/png", "The strength calibration plot."), **errors(404, 422, 503)},
)
async def persona_calibration(
    name: NameParam, model: Annotated[str, Query()], services: ServicesDep
) -> Response:
    """How a mapped persona's default strength was chosen on the target (the generated method):
    effect and perplexity per strength tried, the fluency bar and the stored default."""
    persona = await services.persona_admin.get(name, model)
    calibration = persona["provenance"].get("strength_calibration")
    if calibration is None:
        message = f"persona '{name}' of model '{model}' has no strength calibration (only a persona mapped "
        raise APIError(404, message + "by the generated method has one)", "invalid_request_error")
    source = f"'{persona['provenance'].get('source_name')}' on '{persona['provenance'].get('source_model')}'"
    title = f"{name} on {model}, mapped from {source}"
    png = await asyncio.to_thread(calibration_png, calibration, title)
    return Response(png, media_type="image/png")


def _handle(job: Any) -> JobHandle:
    return JobHandle(id=job.id, status_url=f"/admin/jobs/{job.id}")


def _mapping_summary(info: Any) -> MappingSummary:
    blocks = info.metadata.get("blocks", {})
    return MappingSummary(
        id=info.id,
        source_model=info.source_model,
        target_model=info.target_model,
        method=info.metadata.get("method"),
        layers={str(k): v for k, v in info.layer_map.items()},
        lambda_={block: d.get("lambda") for block, d in blocks.items()},
        r2={block: d.get("r2") for block, d in blocks.items()},
        created_at=info.created_at,
    )
