// The library view: personas per model with where they came from; versions, restore, delete,
// import and export (the admin API).

import { getBlob, getJson, request, sendJson } from "./api.js";
import { $, announcePersonasChanged, clearError, downloadBlob, el, fillSelect, showError } from "./ui.js";

const EXPORT_FORMATS = ["safetensors", "gguf", "pt"];
const ALL_MODELS = "all models";

let state;

export function describeProvenance(provenance) {
  const origin = describeOrigin(provenance);
  return provenance.restored_from ? `${origin}; restored from v${provenance.restored_from}` : origin;
}

function describeOrigin(provenance) {
  const kind = provenance.kind || "of unknown origin";
  if (kind === "mapped") {
    const scale = provenance.strength_calibration ? `, scale ×${provenance.strength_calibration.scale}` : "";
    return `mapped from '${provenance.source_name}' on ${provenance.source_model} (${provenance.method}${scale})`;
  }
  if (kind === "imported") return `imported from ${provenance.format} (${provenance.filename})`;
  if (kind === "extracted") {
    const questions = provenance.questions ? `, ${provenance.questions} questions` : "";
    return `extracted${provenance.source === "demo" ? " (demo)" : questions}`;
  }
  return kind;
}

function when(seconds) {
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 16);
}

function query(persona) {
  return `model=${encodeURIComponent(persona.model)}`;
}

async function exportAs(persona, format) {
  const path = `/admin/personas/${persona.name}/export?${query(persona)}&format=${format}`;
  const extension = format === "pt" ? "pt" : format;
  downloadBlob(await getBlob(path), `${persona.name}-${persona.model}.${extension}`);
}

// Delete asks twice by hand (no confirm() dialog): the first click arms, the second deletes.
function deleteButton(persona) {
  const button = el("button", { text: "Delete", "data-testid": "delete" });
  button.addEventListener("click", async () => {
    if (!button.dataset.armed) {
      button.dataset.armed = "1";
      button.textContent = "Really delete?";
      setTimeout(() => {
        delete button.dataset.armed;
        button.textContent = "Delete";
      }, 4000);
      return;
    }
    await guarded(async () => {
      await request(`/admin/personas/${persona.name}?${query(persona)}`, {
        method: "DELETE",
        headers: { "If-Match": String(persona.version) },
      });
      announcePersonasChanged();
    });
  });
  return button;
}

// A detail row under a persona's row (its versions, its calibration plot); a second click closes it.
async function toggleDetail(row, kind, build) {
  const open = row.nextElementSibling;
  if (open && open.classList.contains("detail")) {
    open.remove();
    if (open.dataset.testid === kind) return;
  }
  const cell = el("td", { colspan: 8 }, await build());
  row.after(el("tr", { class: "detail", "data-testid": kind }, cell));
}

async function versionList(persona) {
  const kept = await getJson(`/admin/personas/${persona.name}/versions?${query(persona)}`);
  const items = kept.data.map((version) => {
    const restore = el("button", {
      text: "Restore",
      "data-testid": "restore",
      onclick: () =>
        guarded(async () => {
          await sendJson("POST", `/admin/personas/${persona.name}/restore`, {
            model: persona.model,
            version: version.version,
          });
          announcePersonasChanged();
        }),
    });
    const text = `v${version.version} · ${when(version.created_at)} · ${describeProvenance(version.provenance)} `;
    return el("li", {}, text, version.version === persona.version ? "(current)" : restore);
  });
  return el("ul", { class: "versions" }, ...items);
}

// How a mapped persona's vector scale was chosen on the target (the generated method only).
async function calibrationPlot(persona) {
  const png = await getBlob(`/admin/personas/${persona.name}/calibration.png?${query(persona)}`);
  return el("img", { src: URL.createObjectURL(png), alt: "strength calibration", class: "plot" });
}

async function guarded(action) {
  clearError();
  try {
    await action();
  } catch (error) {
    showError(error);
  }
}

function actions(persona, row) {
  const exports = EXPORT_FORMATS.map((format) =>
    el("button", { text: format, title: `export as ${format}`, "data-testid": `export-${format}`,
      onclick: () => guarded(() => exportAs(persona, format)) }),
  );
  const versions = el("button", { text: "Versions", "data-testid": "versions-button",
    onclick: () => guarded(() => toggleDetail(row, "versions", () => versionList(persona))) });
  const calibration = persona.provenance.strength_calibration
    ? el("button", { text: "Calibration", "data-testid": "calibration-button",
      onclick: () => guarded(() => toggleDetail(row, "calibration", () => calibrationPlot(persona))) })
    : null;
  const exportLabel = el("span", { class: "hint", text: " export " });
  return el("td", { class: "actions admin-only" }, versions, calibration, exportLabel, ...exports, " ",
    deleteButton(persona));
}

function personaRow(persona) {
  const row = el("tr", { "data-testid": "library-row", "data-name": persona.name, "data-model": persona.model });
  const layers = Array.isArray(persona.layers) ? persona.layers : Object.keys(persona.layers);
  row.append(
    el("td", { text: persona.name }),
    el("td", { text: persona.model }),
    el("td", { text: persona.version }),
    el("td", { text: layers.join(", ") }),
    el("td", { text: persona.default_strength }),
    el("td", { text: describeProvenance(persona.provenance), title: JSON.stringify(persona.provenance) }),
    el("td", { text: persona.description }),
    actions(persona, row),
  );
  return row;
}

async function refresh() {
  const model = $("library-model").value;
  const filter = model && model !== ALL_MODELS ? `?model=${encodeURIComponent(model)}` : "";
  const listing = await getJson(`${state.admin ? "/admin" : "/v1"}/personas${filter}`);
  $("library-rows").replaceChildren(...listing.data.map(personaRow));
}

async function importFile(event) {
  event.preventDefault();
  clearError();
  const file = $("import-file").files[0];
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", $("import-model").value);
  if ($("import-layers").value.trim()) form.append("layers", $("import-layers").value.trim());
  if ($("import-strength").value) form.append("default_strength", $("import-strength").value);
  $("import-status").textContent = "importing…";
  try {
    const name = encodeURIComponent($("import-name").value.trim());
    const response = await request(`/admin/personas/${name}/import`, { method: "POST", form });
    const persona = await response.json();
    $("import-status").textContent = `imported ${persona.name} v${persona.version} on ${persona.model}`;
    announcePersonasChanged();
  } catch (error) {
    $("import-status").textContent = "";
    showError(error);
  }
}

export function showLibraryModels(models) {
  fillSelect($("library-model"), [ALL_MODELS, ...models.map((m) => m.id)]);
  fillSelect($("import-model"), models.map((m) => m.id));
}

export function initLibrary(shared) {
  state = shared;
  const reload = () => guarded(refresh);
  $("library-refresh").addEventListener("click", reload);
  $("library-model").addEventListener("change", reload);
  $("import-form").addEventListener("submit", importFile);
  document.addEventListener("personas-changed", reload);
  return reload;
}
