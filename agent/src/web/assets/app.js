// Bulwark's dashboard: the little script it needs. No framework.
//  - [data-refresh] regions reload from their URL every data-every seconds;
//  - form[data-api] sends its fields as JSON to the API (with the CSRF
//    token), then follows data-then: "task" (the task page), "reload", or a path;
//  - form[data-wizard] sends the restore wizard's rows.
"use strict";

function csrf() {
  var m = document.querySelector('meta[name="csrf-token"]');
  return m ? m.content : "";
}

function fields(form) {
  var out = {};
  Array.prototype.forEach.call(form.elements, function (el) {
    if (!el.name || el.disabled || el.type === "submit") return;
    var name = el.name, v;
    if (name.slice(-2) === "[]") {
      name = name.slice(0, -2);
      out[name] = out[name] || [];
      if (el.checked) out[name].push(el.value);
      return;
    }
    if (el.type === "radio" && !el.checked) return;
    if (el.type === "checkbox") v = el.checked;
    else if (el.type === "number" || el.dataset.type === "number") {
      if (el.value === "") return;
      v = Number(el.value);
    } else v = el.value;
    out[name] = v;
  });
  return out;
}

function say(form, text, bad) {
  var m = form.querySelector(".msg");
  if (!m) return;
  m.textContent = text;
  m.className = "msg" + (bad ? " bad" : "");
  if (bad) m.setAttribute("role", "alert");
}

function send(form, url, body, then) {
  var headers = { "Content-Type": "application/json" };
  var token = csrf();
  if (token) headers["X-CSRF-Token"] = token;
  say(form, "Working…", false);
  return fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: headers,
    body: JSON.stringify(body),
  }).then(function (r) {
    return r.text().then(function (t) {
      var j = {};
      try { j = t ? JSON.parse(t) : {}; } catch (e) { j = { error: t }; }
      if (!r.ok) {
        say(form, j.error || ("HTTP " + r.status), true);
        return;
      }
      if (then === "task" && j.task !== undefined) location.assign("/tasks/" + j.task);
      else if (then === "reload") location.reload();
      else if (then) location.assign(then);
      else say(form, "Done.", false);
    });
  }, function (e) {
    say(form, "No answer: " + e, true);
  });
}

function wizard(form) {
  var vms = [];
  form.querySelectorAll("tr.vm").forEach(function (row) {
    var get = function (n) { return row.querySelector('[name="' + n + '"]'); };
    if (!get("snapshot")) return;
    vms.push({
      snapshot: get("snapshot").value,
      as: get("as").value,
      live: get("mode").value === "live",
      storage_dir: get("storage_dir").value,
      start: get("start").checked,
    });
  });
  return { repository: form.dataset.repository || null, vms: vms };
}

document.addEventListener("submit", function (ev) {
  var form = ev.target;
  if (form.dataset.wizard) {
    ev.preventDefault();
    send(form, form.dataset.wizard, wizard(form), "task");
    return;
  }
  if (!form.dataset.api) return;
  ev.preventDefault();
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
  send(form, form.dataset.api, fields(form), form.dataset.then);
});

function refresh(region) {
  var every = Math.max(1, Number(region.dataset.every || 10)) * 1000;
  var busy = false;
  setInterval(function () {
    if (busy || document.hidden) return;
    // Leave a region alone while someone is typing in it.
    if (region.contains(document.activeElement) && document.activeElement.tagName !== "BUTTON"
        && document.activeElement !== region) return;
    busy = true;
    fetch(region.dataset.refresh, { credentials: "same-origin" }).then(function (r) {
      if (r.status === 401) { location.assign("/login?next=" + encodeURIComponent(location.pathname)); return; }
      if (r.ok && !r.redirected) return r.text().then(function (t) { region.innerHTML = t; });
    }).finally(function () { busy = false; });
  }, every);
}

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("[data-refresh]").forEach(refresh);
});
