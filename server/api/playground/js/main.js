// The playground's start: find which keys the server wants, load the models, wire the views.

import { ApiError, forgetKeys, getJson, getKey, setKey } from "./api.js";
import { initBake, showBakeModels } from "./bake.js";
import { initCompare, showModels } from "./compare.js";
import { initLibrary, showLibraryModels } from "./library.js";
import { initMake, showMakeModels } from "./make.js";
import { $, showError } from "./ui.js";

const KEY_PROMPTS = {
  api: "This server asks for an API key (serve --api-key).",
  admin: "Admin actions (library edits, import, extraction, mapping) need the admin key (serve --admin-key).",
};

// What every view shares: whether admin routes answer, and the personas of each model (cached
// until something changes them).
const state = {
  admin: false,
  models: [],
  cache: new Map(),
  // A model the server began to serve (a bake): every model picker offers it from now on.
  addModel(id) {
    if (!this.models.some((model) => model.id === id)) this.models.push({ id });
    return showAllModels(this.models);
  },
  async personas(model) {
    if (!this.cache.has(model)) {
      const listing = getJson(`/v1/personas?model=${encodeURIComponent(model)}`).then((body) => body.data);
      this.cache.set(model, listing);
      listing.catch(() => this.cache.delete(model));
    }
    return this.cache.get(model);
  },
};

function askKey(scope) {
  const dialog = $("key-dialog");
  $("key-dialog-text").textContent = KEY_PROMPTS[scope];
  $("key-input").value = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const given = dialog.returnValue === "ok" ? $("key-input").value.trim() : "";
        if (given) setKey(scope, given);
        resolve(Boolean(given));
      },
      { once: true },
    );
  });
}

// /v1 with the stored key, asking for one while the server answers 401.
async function loadModels() {
  for (;;) {
    try {
      return (await getJson("/v1/models")).data;
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) throw error;
      $("api-key-button").hidden = false;
      showError(error);
      if (!(await askKey("api"))) return [];
    }
  }
}

// Admin actions show only when the admin API answers: with no --admin-key it does for this
// machine's own browser; with one, once the key is given.
async function probeAdmin() {
  try {
    await getJson("/admin/personas");
    state.admin = true;
    $("admin-state").textContent = getKey("admin") ? "admin (key given)" : "admin";
  } catch (error) {
    state.admin = false;
    $("admin-key-button").hidden = error.status !== 401;
    $("admin-state").textContent =
      error.status === 401 ? "admin: key needed" : "admin: only from the server's own machine";
  }
  document.body.classList.toggle("no-admin", !state.admin);
  $("forget-keys").hidden = !(getKey("api") || getKey("admin"));
}

async function showAllModels(models) {
  showLibraryModels(models);
  await Promise.all([showModels(models), showMakeModels(models), showBakeModels(models)]);
}

function initTabs() {
  const tabs = document.querySelectorAll("nav [role=tab]");
  for (const tab of tabs) {
    tab.addEventListener("click", () => {
      for (const other of tabs) {
        other.setAttribute("aria-selected", String(other === tab));
        $(`tab-${other.dataset.tab}`).hidden = other !== tab;
      }
    });
  }
}

async function start() {
  initTabs();
  initCompare(state);
  const reloadLibrary = initLibrary(state);
  initMake(state);
  initBake(state);
  document.addEventListener("personas-changed", () => state.cache.clear(), { capture: true });
  $("api-key-button").addEventListener("click", async () => (await askKey("api")) && location.reload());
  $("admin-key-button").addEventListener("click", async () => (await askKey("admin")) && location.reload());
  $("forget-keys").addEventListener("click", () => {
    forgetKeys();
    location.reload();
  });
  state.models = await loadModels();
  await probeAdmin();
  await Promise.all([showAllModels(state.models), reloadLibrary()]);
  document.body.dataset.ready = "true";
}

start().catch(showError);
