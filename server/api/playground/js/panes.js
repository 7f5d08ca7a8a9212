// Answer panes: several chat completions of one prompt, streamed side by side.
// Every pane sends the same sampling fields and seed, so what differs between panes is the steering.

import { streamChunks } from "./api.js";
import { el, showError } from "./ui.js";

function formatScores(scores) {
  return Object.entries(scores)
    .map(([name, score]) => `${name} ${score.toFixed(3)}`)
    .join(" · ");
}

function paneElement(spec) {
  const output = el("pre", { class: "output", "data-testid": `output-${spec.id}` });
  const scores = el("div", { class: "scores", "data-testid": "scores" });
  const failure = el("div", { class: "pane-error", "data-testid": "pane-error" });
  const pane = el(
    "div",
    { class: spec.steered ? "pane steered" : "pane", "data-testid": `pane-${spec.id}`, "data-state": "streaming" },
    el("h3", { text: spec.title }),
    output,
    scores,
    failure,
  );
  return { pane, output, scores, failure };
}

async function streamInto(parts, body, signal) {
  for await (const chunk of streamChunks("/v1/chat/completions", body, signal)) {
    const choice = chunk.choices && chunk.choices[0];
    if (choice && choice.delta && choice.delta.content) parts.output.textContent += choice.delta.content;
    if (chunk.persona_scores) parts.scores.textContent = formatScores(chunk.persona_scores);
  }
}

// specs: [{id, title, steered, fields}] where fields are the request's steering fields.
// Resolves when every pane has finished (or failed); a failure shows the server's message.
export async function runPanes(container, base, specs, signal) {
  const parts = specs.map((spec) => ({ spec, ...paneElement(spec) }));
  container.replaceChildren(...parts.map((part) => part.pane));
  await Promise.all(
    parts.map(async (part) => {
      try {
        await streamInto(part, { ...base, ...part.spec.fields }, signal);
        part.pane.dataset.state = "done";
      } catch (error) {
        if (error.name === "AbortError") return;
        part.failure.textContent = error.message;
        part.pane.dataset.state = "error";
        showError(error);
      }
    }),
  );
}

// The steering fields of a request: one persona added, or a list of terms (a composition, or any
// term with an operator: ablate, cap).
export function steeringFields(terms, positions) {
  const fields = {};
  if (terms.length === 1 && !terms[0].operator) {
    fields.persona = terms[0].name;
    fields.persona_strength = terms[0].strength;
  } else if (terms.length) {
    fields.persona = terms.map((term) => ({ ...term }));
  }
  if (positions && terms.length) fields.steering = { positions };
  return fields;
}
