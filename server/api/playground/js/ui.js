// Small DOM helpers and the page's error banner.

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export function $(id) {
  return document.getElementById(id);
}

export function showError(error) {
  const banner = $("error");
  banner.textContent = error instanceof Error ? error.message : String(error);
  banner.hidden = false;
}

export function clearError() {
  $("error").hidden = true;
}

export function fillSelect(select, values, selected) {
  const keep = selected ?? select.value;
  select.replaceChildren(...values.map((value) => el("option", { value, text: value })));
  if (values.includes(keep)) select.value = keep;
}

export function lines(text) {
  return text.split("\n").map((line) => line.trim()).filter(Boolean);
}

// Personas changed (imported, extracted, mapped, deleted): every view re-reads them.
export function announcePersonasChanged() {
  document.dispatchEvent(new CustomEvent("personas-changed"));
}

export function downloadBlob(blob, filename) {
  const link = el("a", { href: URL.createObjectURL(blob), download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

// A job's progress callback (fraction in [0, 1], status) drawing on a <progress> and a label.
export function progressShower(bar, label) {
  return (fraction, status) => {
    const percent = Math.round(fraction * 100);
    bar.value = percent;
    label.textContent = `${status} ${percent}%`;
  };
}

// Offer the personas of ``model`` in ``select`` (state.personas caches them per model).
export async function fillPersonaSelect(state, select, model) {
  const personas = await state.personas(model);
  fillSelect(select, personas.map((p) => p.name));
}
