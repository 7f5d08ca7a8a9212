// The compare view: unsteered next to steered (one persona or a composition), or a strength sweep.

import { runPanes, steeringFields } from "./panes.js";
import { $, clearError, el, fillSelect, showError } from "./ui.js";

// A slider spans -SPAN..+SPAN times the persona's default strength (negative steers away).
const SPAN = 3;
const STEPS_PER_DEFAULT = 20;
const SWEEP_MULTIPLES = [0, 0.5, 1, 2];
const OPERATORS = ["add", "ablate", "cap"];

let state;
let running = null;

function strengthRange(defaultStrength) {
  const unit = Math.abs(defaultStrength) || 1;
  return { min: -SPAN * unit, max: SPAN * unit, step: unit / STEPS_PER_DEFAULT };
}

function setSlider(slider, number, persona) {
  const range = strengthRange(persona ? persona.default_strength : 1);
  Object.assign(slider, { min: range.min, max: range.max, step: range.step });
  slider.value = number.value = persona ? persona.default_strength : 1;
}

// A persona row: which persona, and its strength as a slider with the exact number beside it.
function termRow(personas, index) {
  const suffix = index === 0 ? "" : `-${index + 1}`;
  const select = el("select", { "data-testid": `persona${suffix}`, "aria-label": "persona" });
  fillSelect(select, personas.map((p) => p.name));
  const slider = el("input", { type: "range", "data-testid": `strength${suffix}`, "aria-label": "strength" });
  const number = el("input", { type: "number", step: "any", "data-testid": `strength-value${suffix}` });
  const byName = () => personas.find((p) => p.name === select.value);
  select.addEventListener("change", () => setSlider(slider, number, byName()));
  slider.addEventListener("input", () => (number.value = slider.value));
  number.addEventListener("input", () => {
    const value = Number(number.value);
    if (value < Number(slider.min)) slider.min = value;
    if (value > Number(slider.max)) slider.max = value;
    slider.value = value;
  });
  setSlider(slider, number, byName());
  const operator = el("select", { "data-testid": `operator${suffix}`, "aria-label": "operator" });
  fillSelect(operator, OPERATORS);
  // A cap's bounds (either may be empty); a cap has no strength, an ablation's defaults to 1.
  const max = el("input", { type: "number", step: "any", placeholder: "max", "data-testid": `cap-max${suffix}` });
  const min = el("input", { type: "number", step: "any", placeholder: "min", "data-testid": `cap-min${suffix}` });
  const showOperator = () => {
    const cap = operator.value === "cap";
    max.hidden = min.hidden = !cap;
    slider.hidden = number.hidden = cap;
  };
  operator.addEventListener("change", showOperator);
  showOperator();
  const remove = el("button", { type: "button", text: "×", title: "remove", onclick: () => row.remove() });
  const row = el("div", { class: "term" }, select, operator, slider, number, min, max, index === 0 ? null : remove);
  row.term = () => termOf(select.value, operator.value, Number(number.value), min.value, max.value);
  return row;
}

// A row as a request's persona term: {name, strength} for add (the API's default), and the
// operator with its bounds (a cap) or its strength (an ablation) otherwise.
function termOf(name, operator, strength, min, max) {
  if (operator === "add") return { name, strength };
  if (operator === "ablate") return { name, operator, strength };
  const term = { name, operator };
  if (max !== "") term.max = Number(max);
  if (min !== "") term.min = Number(min);
  return term;
}

// The sweep's strengths follow the first persona: 0, half, once and twice its default.
function resetSweep(persona) {
  const unit = persona ? persona.default_strength : 1;
  $("sweep-strengths").value = SWEEP_MULTIPLES.map((m) => +(m * unit).toFixed(3)).join(", ");
}

async function resetTerms() {
  const personas = await state.personas($("model").value);
  const first = termRow(personas, 0);
  first.addEventListener("change", (event) => {
    if (event.target.tagName === "SELECT") resetSweep(personas.find((p) => p.name === first.term().name));
  });
  $("terms").replaceChildren(first);
  $("add-term").disabled = personas.length === 0;
  resetSweep(personas.find((p) => p.name === first.term().name));
}

function terms() {
  return [...$("terms").children].map((row) => row.term()).filter((term) => term.name);
}

// The fields every pane shares: the prompt and the sampling controls of the compare view.
export function baseRequest(model, monitored = []) {
  const body = {
    model,
    messages: [{ role: "user", content: $("prompt").value }],
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    seed: Number($("seed").value),
  };
  if ($("monitor").checked && monitored.length) body.persona_monitor = [...new Set(monitored)];
  return body;
}

function composeSpecs(chosen, positions) {
  const base = { id: "base", title: "unsteered", steered: false, fields: {} };
  if (!chosen.length) return [base]; // this model has no persona yet: nothing to compare with
  const title = chosen.map(termTitle).join(" + ");
  return [base, { id: "steered", title, steered: true, fields: steeringFields(chosen, positions) }];
}

function termTitle(term) {
  if (!term.operator) return `${term.name} × ${term.strength}`;
  if (term.operator === "ablate") return `ablate ${term.name} × ${term.strength}`;
  const bounds = [term.min === undefined ? "" : `min ${term.min}`, term.max === undefined ? "" : `max ${term.max}`];
  return `cap ${term.name} (${bounds.filter(Boolean).join(", ")})`;
}

function sweepSpecs(chosen, positions) {
  const name = chosen[0] && chosen[0].name;
  if (!name) throw new Error("choose a persona to sweep");
  const strengths = $("sweep-strengths").value.split(",").map(Number).filter((s) => !Number.isNaN(s));
  if (!strengths.length) throw new Error("give the strengths to sweep, e.g. 0, 2, 4");
  return strengths.map((strength, index) => ({
    id: `sweep-${index}`,
    title: `${name} × ${strength}`,
    steered: strength !== 0,
    fields: steeringFields([{ name, strength }], positions),
  }));
}

async function generate(event) {
  event.preventDefault();
  clearError();
  if (running) running.abort();
  running = new AbortController();
  const chosen = terms();
  const positions = $("positions").value;
  try {
    const sweep = document.querySelector('input[name="view"]:checked').value === "sweep";
    const specs = sweep ? sweepSpecs(chosen, positions) : composeSpecs(chosen, positions);
    const monitored = (sweep ? chosen.slice(0, 1) : chosen).map((term) => term.name);
    $("panes").dataset.state = "running";
    await runPanes($("panes"), baseRequest($("model").value, monitored), specs, running.signal);
    $("panes").dataset.state = "done";
  } catch (error) {
    showError(error);
  }
}

export async function showModels(models) {
  fillSelect($("model"), models.map((m) => m.id));
  await resetTerms();
}

export function initCompare(shared) {
  state = shared;
  $("compare-form").addEventListener("submit", generate);
  $("model").addEventListener("change", () => resetTerms().catch(showError));
  $("add-term").addEventListener("click", async () => {
    const personas = await state.personas($("model").value);
    $("terms").append(termRow(personas, $("terms").children.length));
  });
  for (const radio of document.querySelectorAll('input[name="view"]')) {
    radio.addEventListener("change", () => {
      const sweep = radio.value === "sweep" && radio.checked;
      $("sweep-box").hidden = !sweep;
      $("add-term").hidden = sweep;
    });
  }
  document.addEventListener("personas-changed", () => resetTerms().catch(showError));
}
