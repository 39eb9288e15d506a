// ds01's projects home (included by home.html): the user's projects from the ds01
// service's api/home, every row built with textContent (never innerHTML), and
// Start / Stop through the service's launch and retire API.
//
// The service accepts its OAuth cookie on a script's request only with its own
// XSRF token. Its "home" page hands that over: a navigation there (signing in
// through the hub's OAuth the first time) returns here with the token in the
// fragment, which is dropped from the address bar at once and kept in memory only.
(function () {
  "use strict";
  const root = document.getElementById("ds01-home");
  if (!root || !window.fetch) {
    return;
  }
  const service = root.dataset.service;
  const user = root.dataset.user;
  const FRAGMENT = "ds01-xsrf=";
  const SIGN_IN_KEY = "ds01-home-sign-in";
  const SIGN_IN_AGAIN_MS = 20000; // a sign-in that did not help is not retried sooner
  const POLL_BUSY_MS = 3000; // while a project starts, builds, waits or stops
  const POLL_IDLE_MS = 30000;
  const table = document.getElementById("ds01-projects");
  const tbody = table.querySelector("tbody");
  const status = document.getElementById("ds01-home-status");
  const loading = document.getElementById("ds01-loading");
  const more = document.getElementById("ds01-more");
  const messageBox = document.getElementById("ds01-message");
  const newForm = document.getElementById("ds01-new");
  let xsrf = takeToken();
  let timer = null;
  let choices = { gpus: { max: 0, mig: false, note: "" }, types: [] };

  function takeToken() {
    const at = location.hash.indexOf(FRAGMENT);
    if (at < 0) {
      return null;
    }
    const token = decodeURIComponent(location.hash.slice(at + FRAGMENT.length).split("&")[0]);
    history.replaceState(history.state, "", location.pathname + location.search);
    return token;
  }

  class SignInNeeded extends Error {}

  function signIn() {
    const last = Number(sessionStorage.getItem(SIGN_IN_KEY) || 0);
    if (Date.now() - last < SIGN_IN_AGAIN_MS) {
      showMessage(
        "The ds01 service did not sign you in; open My images, or reload this page in a moment.",
        "warning",
      );
      loading.classList.add("d-none");
      return;
    }
    sessionStorage.setItem(SIGN_IN_KEY, String(Date.now()));
    location.replace(service + "home");
  }

  async function api(method, path, body) {
    if (!xsrf) {
      throw new SignInNeeded();
    }
    const response = await fetch(service + path, {
      method: method,
      credentials: "same-origin",
      redirect: "manual", // a redirect means: sign in again (the hub's OAuth)
      headers: {
        Accept: "application/json",
        "Content-Type": "application/json",
        "X-XSRFToken": xsrf,
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.type === "opaqueredirect" || response.status === 401) {
      throw new SignInNeeded();
    }
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (!response.ok) {
      const why = data && data.message ? data.message : response.statusText;
      throw new Error(why || "the ds01 service answered " + response.status);
    }
    return data;
  }

  function showMessage(text, kind) {
    messageBox.textContent = text;
    messageBox.className = "alert alert-" + (kind || "info");
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "className") {
        node.className = value;
      } else if (name === "href") {
        // only paths on this origin: the hub's server URLs and the service's pages
        if (typeof value === "string" && value.startsWith("/") && !value.startsWith("//")) {
          node.setAttribute("href", value);
        }
      } else {
        node.setAttribute(name, value);
      }
    }
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    return node;
  }

  function when(epoch) {
    if (!epoch) {
      return "never";
    }
    const d = new Date(epoch * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return (
      d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes())
    );
  }

  const BADGES = {
    running: "bg-success",
    starting: "bg-info text-dark",
    building: "bg-info text-dark",
    waiting: "bg-warning text-dark",
    stopping: "bg-secondary",
    stopped: "bg-light text-dark border",
  };

  // What the user picked in each GPU choice, kept when the list is drawn again.
  const picked = {};

  // A GPU choice: a select of 0..max GPUs (and a MIG slice), and "wait for a GPU".
  function gpuChoice(container, idPrefix) {
    container.replaceChildren();
    const gpus = choices.gpus || {};
    if (!gpus.max && !gpus.mig) {
      container.append(el("span", { className: "text-muted small" }, gpus.note || "No GPU"));
      return () => ({});
    }
    const select = el("select", {
      className: "form-select form-select-sm ds01-gpus",
      id: idPrefix + "-gpus",
      "aria-label": "GPUs",
    });
    select.append(el("option", { value: "0" }, "No GPU"));
    for (let n = 1; n <= gpus.max; n++) {
      select.append(el("option", { value: String(n) }, n + (n === 1 ? " GPU" : " GPUs")));
    }
    if (gpus.mig) {
      select.append(el("option", { value: "mig" }, "One MIG slice"));
    }
    const wait = el("input", {
      type: "checkbox",
      className: "form-check-input ds01-wait",
      id: idPrefix + "-wait",
    });
    const label = el(
      "label",
      { className: "form-check-label small", for: idPrefix + "-wait" },
      "Wait for a GPU if none is free",
    );
    const check = el("div", { className: "form-check" });
    check.append(wait, label);
    container.append(select, check);
    if (gpus.note) {
      select.title = gpus.note;
    }
    const before = picked[idPrefix];
    if (before && [...select.options].some((o) => o.value === before.value)) {
      select.value = before.value;
      wait.checked = before.wait;
    }
    const remember = () => (picked[idPrefix] = { value: select.value, wait: wait.checked });
    select.addEventListener("change", remember);
    wait.addEventListener("change", remember);
    return () => {
      const value = select.value;
      if (value === "0") {
        return {};
      }
      const asked = { gpus: value === "mig" ? "mig" : Number(value) };
      if (wait.checked) {
        asked.wait = true;
      }
      return asked;
    };
  }

  function projectPath(name, action) {
    return "api/projects/" + encodeURIComponent(user) + "/" + encodeURIComponent(name) + "/" + action;
  }

  // Run one action (a start, a stop): say what it did or why not, then list again.
  async function act(buttons, work) {
    buttons.forEach((b) => (b.disabled = true));
    let done = false;
    try {
      const result = await work();
      showMessage((result && result.message) || "Done.", "success");
      done = true;
    } catch (e) {
      if (e instanceof SignInNeeded) {
        signIn();
        return false;
      }
      showMessage(e.message, "danger");
    } finally {
      buttons.forEach((b) => (b.disabled = false));
    }
    refresh();
    return done;
  }

  function imageCell(p) {
    const cell = el("td", { className: "ds01-image" });
    const image = p.image || {};
    if (image.built_at) {
      cell.append(el("span", {}, "built " + when(image.built_at)));
    } else {
      cell.append(el("span", { className: "badge bg-warning text-dark" }, "not built"));
      if (image.cleaned) {
        cell.append(el("div", { className: "small text-muted" }, "removed by the image cleaner: the next start rebuilds it"));
      }
    }
    if (image.outdated) {
      cell.append(" ", el("span", { className: "badge bg-warning text-dark ds01-outdated" }, "Dockerfile changed: rebuild"));
    }
    if (image.last_build === "failed" || image.last_build === "interrupted") {
      cell.append(" ", el("span", { className: "badge bg-danger" }, "last build " + image.last_build));
    }
    const lost = image.lost_packages || [];
    if (lost.length) {
      const note = el("div", { className: "small text-warning-emphasis ds01-lost" });
      note.append(
        el("span", {}, "Lost at the last retire: " + lost.join(", ") + ". "),
        el("a", { href: p.image_page }, "Add them to the image"),
      );
      cell.append(note);
    }
    return cell;
  }

  function actionsCell(p) {
    const cell = el("td", { className: "ds01-actions" });
    const row = el("div", { className: "d-flex flex-wrap gap-2 align-items-center" });
    const buttons = [];
    if (p.can_open) {
      row.append(el("a", { className: "btn btn-sm btn-primary ds01-open", href: p.url }, "Open"));
    }
    if (p.can_start) {
      const choice = el("div", { className: "ds01-gpu-choice" });
      const asked = gpuChoice(choice, "ds01-" + p.project);
      const start = el("button", { type: "button", className: "btn btn-sm btn-success ds01-start" }, "Start");
      start.addEventListener("click", () =>
        act(buttons, () => api("POST", projectPath(p.project, "launch"), asked())),
      );
      buttons.push(start);
      row.append(choice, start);
    }
    if (p.can_stop) {
      const stop = el("button", { type: "button", className: "btn btn-sm btn-danger ds01-stop" }, "Stop");
      stop.addEventListener("click", () =>
        act(buttons, () => api("POST", projectPath(p.project, "retire"), {})),
      );
      buttons.push(stop);
      row.append(stop);
    }
    row.append(el("a", { className: "btn btn-sm btn-outline-secondary ds01-image-page", href: p.image_page }, "Image page"));
    cell.append(row);
    return cell;
  }

  function projectRow(p) {
    const tr = el("tr", { "data-project": p.project, "data-state": p.state });
    const name = el("td", { className: "ds01-name" });
    name.append(el("strong", {}, p.project), " ", el("span", { className: "badge bg-secondary ds01-type" }, p.type));
    for (const notice of p.notices || []) {
      name.append(el("div", { className: "small text-warning-emphasis ds01-notice" }, notice));
    }
    const state = el("td", { className: "ds01-status" });
    state.append(el("span", { className: "badge " + (BADGES[p.state] || "bg-secondary") }, p.label));
    if (p.server !== null && p.server !== undefined) {
      state.append(el("div", { className: "small text-muted" }, p.server ? "server " + p.server : "default server"));
    }
    if (p.message) {
      state.append(el("div", { className: "small ds01-status-message" }, p.message));
    }
    const gpus = el("td", { className: "ds01-gpus-held" }, p.gpus.length ? String(p.gpus.length) : "—");
    if (p.gpus.length) {
      gpus.title = p.gpus.join(", ");
    }
    tr.append(name, state, gpus, imageCell(p), el("td", { className: "ds01-last-used" }, when(p.last_used)), actionsCell(p));
    return tr;
  }

  let newProjectChoice = () => ({});

  function renderNewForm() {
    const select = document.getElementById("ds01-new-project-type");
    const keep = select.value;
    select.replaceChildren();
    for (const t of choices.types || []) {
      const option = el("option", { value: t.name }, t.description ? t.name + " — " + t.description : t.name);
      select.append(option);
    }
    select.value = keep || choices.default_type || "";
    if (!select.value && select.options.length) {
      select.selectedIndex = 0;
    }
    // the GPU choice is kept while the user fills the form in
    const slot = newForm.querySelector(".ds01-gpu-choice");
    if (!slot.dataset.ready) {
      newProjectChoice = gpuChoice(slot, "ds01-new");
      slot.dataset.ready = "1";
    }
    newForm.classList.remove("d-none");
  }

  function render(data) {
    choices = data;
    tbody.replaceChildren(...data.projects.map(projectRow));
    table.classList.toggle("d-none", data.projects.length === 0);
    loading.classList.add("d-none");
    status.replaceChildren();
    if (data.projects.length === 0) {
      status.append("You have no projects yet: create one below.");
    } else {
      status.append("Start, stop and open your projects here; packages and rebuilds are on ");
      status.append(el("a", { href: service }, "My images"), ".");
    }
    more.classList.toggle("d-none", !data.more);
    more.textContent = data.more
      ? data.more + " older projects are not shown here; My images lists them all."
      : "";
    renderNewForm();
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const data = await api("GET", "api/home");
      sessionStorage.removeItem(SIGN_IN_KEY);
      render(data);
      const busy = data.projects.some((p) => p.busy);
      timer = setTimeout(refresh, busy ? POLL_BUSY_MS : POLL_IDLE_MS);
    } catch (e) {
      if (e instanceof SignInNeeded) {
        signIn();
        return;
      }
      loading.classList.add("d-none");
      showMessage("Your projects could not be listed: " + e.message, "warning");
      timer = setTimeout(refresh, POLL_IDLE_MS);
    }
  }

  newForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = document.getElementById("ds01-new-project").value.trim();
    const type = document.getElementById("ds01-new-project-type").value;
    const button = newForm.querySelector("button[type=submit]");
    act([button], () =>
      api("POST", projectPath(name, "launch"), Object.assign({ create: true, type: type }, newProjectChoice())),
    ).then((done) => {
      if (done) {
        document.getElementById("ds01-new-project").value = "";
      }
    });
  });

  loading.classList.remove("d-none");
  refresh();
})();
