// The make view: extract a persona (a background job with progress and a per-block report), fit a
// map between two served models, carry a persona across, and compare it with the target's own.

import { getBlob, request, sendJson, waitForJob } from "./api.js";
import { barChart } from "./chart.js";
import { baseRequest } from "./compare.js";
import { runPanes } from "./panes.js";
import {
  $,
  announcePersonasChanged,
  clearError,
  el,
  fillPersonaSelect,
  fillSelect,
  lines,
  progressShower,
  showError,
} from "./ui.js";

let state;

function extractionReport(result) {
  const bars = result.layers.map((report) => ({
    label: `block ${report.layer}`,
    value: report.separation,
    highlight: report.layer === result.recommended_layer,
  }));
  const title = "separation of answers with and without the trait (Cohen's d), per block";
  const persona = result.persona;
  const stored = `Stored '${persona.name}' v${persona.version} on ${persona.model} at block ` +
    `${persona.layers.join(", ")} (answers used: ${result.answers_used.positive} with the trait, ` +
    `${result.answers_used.negative} without).`;
  return [el("p", { text: stored, "data-testid": "extract-stored" }), barChart(bars, { title })];
}

async function extract(event) {
  event.preventDefault();
  clearError();
  const button = event.submitter;
  const body = {
    model: $("extract-model").value,
    positive_prompts: lines($("extract-positive").value),
    negative_prompts: lines($("extract-negative").value),
    questions: lines($("extract-questions").value),
    samples_per_question: Number($("extract-samples").value),
    max_tokens: Number($("extract-tokens").value),
  };
  if ($("extract-strength").value) body.default_strength = Number($("extract-strength").value);
  const name = encodeURIComponent($("extract-name").value.trim());
  const progress = progressShower($("extract-progress"), $("extract-status"));
  $("extract-report").replaceChildren();
  button.disabled = true;
  try {
    progress(0, "queued");
    const job = await sendJson("POST", `/admin/personas/${name}/extract`, body);
    const result = await waitForJob(job.status_url, progress);
    $("extract-report").replaceChildren(...extractionReport(result));
    announcePersonasChanged();
  } catch (error) {
    $("extract-status").textContent = "failed";
    showError(error);
  } finally {
    button.disabled = false;
  }
}

async function fit() {
  clearError();
  const progress = progressShower($("fit-progress"), $("fit-status"));
  const image = $("fit-diagnostics");
  image.hidden = true;
  $("fit-start").disabled = true;
  try {
    progress(0, "queued");
    const body = { source_model: $("fit-source").value, target_model: $("fit-target").value };
    const job = await sendJson("POST", "/admin/mappings", body);
    const result = await waitForJob(job.status_url, progress);
    $("fit-status").textContent = `fitted map ${result.mapping_id}`;
    image.src = URL.createObjectURL(await getBlob(`/admin/mappings/${result.mapping_id}/diagnostics.png`));
    image.hidden = false;
  } catch (error) {
    $("fit-status").textContent = "failed";
    showError(error);
  } finally {
    $("fit-start").disabled = false;
  }
}

// Unsteered, the target's own persona of that name (when it has one) and the mapped one, each at
// its stored default strength, with the compare view's prompt and sampling: the comparison that
// says whether the carried persona works.
async function compareOnTarget(target, nativeName, mapped) {
  const own = (await state.personas(target)).find((p) => p.name === nativeName);
  const specs = [{ id: "map-base", title: `${target}, unsteered`, steered: false, fields: {} }];
  if (own) specs.push({ id: "map-native", title: `native '${own.name}'`, steered: true, fields: { persona: own.name } });
  specs.push({ id: "map-mapped", title: `mapped '${mapped.name}'`, steered: true, fields: { persona: mapped.name } });
  await runPanes($("map-compare"), baseRequest(target), specs);
}

let mapStatusUrl = null;

// A map is a job (the generated method answers and reads hundreds of prompts): its progress shows,
// Cancel stops it, and a source persona updated meanwhile is said.
async function mapPersona(event) {
  event.preventDefault();
  clearError();
  const source = $("fit-source").value;
  const target = $("fit-target").value;
  const persona = $("map-persona").value;
  const targetName = $("map-name").value.trim() || `${persona}-from-${source}`;
  const progress = progressShower($("map-progress"), $("map-status"));
  $("map-start").disabled = true;
  $("map-cancel").disabled = false;
  try {
    progress(0, "queued");
    const body = { source_model: source, target_model: target, method: $("map-method").value, target_name: targetName };
    mapStatusUrl = (await sendJson("POST", `/admin/personas/${encodeURIComponent(persona)}/map`, body)).status_url;
    const result = await waitForJob(mapStatusUrl, progress);
    const mapped = result.persona;
    const scale = mapped.provenance.strength_calibration;
    const note = scale ? `, vector scale ×${scale.scale}, predicted transfer ${scale.predicted_transfer.toFixed(2)}` : "";
    const warning = result.warning ? ` (${result.warning})` : "";
    $("map-status").textContent = `stored '${mapped.name}' v${mapped.version} on ${target}${note}${warning}`;
    announcePersonasChanged();
    await compareOnTarget(target, persona, mapped);
  } catch (error) {
    $("map-status").textContent = "";
    showError(error);
  } finally {
    $("map-start").disabled = false;
    $("map-cancel").disabled = true;
    mapStatusUrl = null;
  }
}

async function cancelMap() {
  if (mapStatusUrl) await request(mapStatusUrl, { method: "DELETE" }).catch(showError);
}

function showSourcePersonas() {
  return fillPersonaSelect(state, $("map-persona"), $("fit-source").value);
}

export async function showMakeModels(models) {
  const ids = models.map((m) => m.id);
  fillSelect($("extract-model"), ids);
  fillSelect($("fit-source"), ids);
  fillSelect($("fit-target"), ids, ids[1]);
  await showSourcePersonas();
}

export function initMake(shared) {
  state = shared;
  $("extract-form").addEventListener("submit", extract);
  $("fit-start").addEventListener("click", fit);
  $("fit-form").addEventListener("submit", mapPersona);
  $("map-cancel").addEventListener("click", cancelMap);
  $("fit-source").addEventListener("change", () => showSourcePersonas().catch(showError));
  document.addEventListener("personas-changed", () => showSourcePersonas().catch(showError));
}
