// The bake form: distil a persona into LoRA weights (a background job), then put the baked model's
// answer next to the steered one's.

import { request, sendJson, waitForJob } from "./api.js";
import { baseRequest } from "./compare.js";
import { runPanes } from "./panes.js";
import {
  $,
  announcePersonasChanged,
  clearError,
  fillPersonaSelect,
  fillSelect,
  progressShower,
  showError,
} from "./ui.js";

let state;
let statusUrl = null;


function retentionNote(provenance) {
  const retention = provenance.retention;
  if (!retention || retention.retained === null) return "";
  return `; it keeps ${retention.retained.toFixed(2)} of the steered persona score shift on ${retention.prompts} held-out prompts`;
}

async function bake(event) {
  event.preventDefault();
  clearError();
  const model = $("bake-model").value;
  const persona = $("bake-persona").value;
  const body = {
    model,
    rank: Number($("bake-rank").value),
    trajectories: Number($("bake-trajectories").value),
    steps: Number($("bake-steps").value),
  };
  const showProgress = progressShower($("bake-progress"), $("bake-status"));
  $("bake-start").disabled = true;
  $("bake-cancel").disabled = false;
  try {
    showProgress(0, "queued");
    statusUrl = (await sendJson("POST", `/admin/personas/${encodeURIComponent(persona)}/bake`, body)).status_url;
    const result = await waitForJob(statusUrl, showProgress);
    $("bake-status").textContent = `serving '${result.model_id}'${retentionNote(result.provenance)}`;
    state.addModel(result.model_id);
    announcePersonasChanged();
    const specs = [
      { id: "bake-steered", title: `${model} steered by '${persona}'`, steered: true, fields: { model, persona } },
      { id: "bake-baked", title: `${result.model_id}, no persona field`, steered: true, fields: { model: result.model_id } },
    ];
    await runPanes($("bake-compare"), baseRequest(model), specs);
  } catch (error) {
    showError(error);
  } finally {
    $("bake-start").disabled = false;
    $("bake-cancel").disabled = true;
    statusUrl = null;
  }
}

async function cancel() {
  if (statusUrl) await request(statusUrl, { method: "DELETE" }).catch(showError);
}

function showPersonas() {
  return fillPersonaSelect(state, $("bake-persona"), $("bake-model").value);
}

export async function showBakeModels(models) {
  fillSelect($("bake-model"), models.map((m) => m.id));
  await showPersonas();
}

export function initBake(shared) {
  state = shared;
  $("bake-form").addEventListener("submit", bake);
  $("bake-cancel").addEventListener("click", cancel);
  $("bake-model").addEventListener("change", () => showPersonas().catch(showError));
}
