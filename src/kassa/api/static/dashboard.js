// Kassa dashboard: the little behaviour server-rendered pages need. No library, no inline script (CSP).
(function () {
  "use strict";
  // Pages with data-refresh="N" reload every N seconds while visible and nobody is typing.
  var every = Number(document.body.dataset.refresh || 0);
  if (every > 0) {
    setInterval(function () {
      var typing = document.activeElement && /INPUT|TEXTAREA|SELECT/.test(document.activeElement.tagName);
      if (document.visibilityState === "visible" && !typing) location.reload();
    }, every * 1000);
  }
  // Forms with data-confirm ask first (revoking a key cannot be undone).
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (e) {
      if (!window.confirm(form.dataset.confirm)) e.preventDefault();
    });
  });
  // JSON editors: refuse to submit a document that does not parse, and say where.
  document.querySelectorAll("textarea[data-json]").forEach(function (area) {
    area.form.addEventListener("submit", function (e) {
      try {
        JSON.parse(area.value);
        area.setCustomValidity("");
      } catch (err) {
        area.setCustomValidity("Not valid JSON: " + err.message);
        area.reportValidity();
        e.preventDefault();
      }
    });
    area.addEventListener("input", function () { area.setCustomValidity(""); });
  });
})();
