// Live updates of the console's pages. What is shown comes from the server as escaped HTML
// (fragments it renders) or is set as text (log lines): nothing is built from raw strings.
"use strict";
(function () {
  const page = document.body.dataset.page;

  // At most one call per `ms`, the last one always made: a busy cluster's stream of
  // events still refreshes the page, a few times a second.
  function throttle(fn, ms) {
    let timer = null;
    return function () {
      if (timer === null) {
        timer = setTimeout(function () { timer = null; fn(); }, ms);
      }
    };
  }

  async function refresh(id, url) {
    const response = await fetch(url, { credentials: "same-origin" });
    if (response.ok) {
      document.getElementById(id).innerHTML = await response.text();
    }
  }

  // Refresh `id` from `url` whenever `events` says something changed (and once it is
  // connected, for what changed before). `data-live="open"` on the body says the page is
  // following (what a test waits for).
  function follow(events, id, url) {
    const update = throttle(function () { refresh(id, url); }, 250);
    events.onopen = function () {
      document.body.dataset.live = "open";
      update();
    };
    events.onmessage = update;
  }

  if (page === "jobs") {
    follow(new EventSource("/events/jobs"), "job-rows", "/jobs/rows" + location.search);
  }

  if (page === "job") {
    const id = document.getElementById("job").dataset.job;
    follow(new EventSource("/events/jobs?job=" + encodeURIComponent(id)), "summary",
      "/jobs/" + encodeURIComponent(id) + "/summary");
    const logs = document.getElementById("logs");
    const lines = new EventSource("/jobs/" + encodeURIComponent(id) + "/logs");
    // The server sends the logs from their start on every connection.
    lines.onopen = function () { logs.textContent = ""; };
    lines.onmessage = function (event) {
      const entry = JSON.parse(event.data);
      const line = document.createElement("div");
      line.className = entry.stream;
      line.textContent = entry.line;
      logs.appendChild(line);
    };
    lines.addEventListener("end", function () { lines.close(); });
  }
})();
