// recon-node console: the pages work without this; it asks before actions and refreshes lists that change.
"use strict";
document.querySelectorAll("form[data-confirm]").forEach(function (form) {
  form.addEventListener("submit", function (ev) {
    if (!window.confirm(form.dataset.confirm)) { ev.preventDefault(); }
  });
});
(function () {
  var every = parseInt(document.body.dataset.refresh || "0", 10);
  if (!every) { return; }
  var busy = function () {
    var a = document.activeElement;
    return a && (a.tagName === "INPUT" || a.tagName === "SELECT") || window.getSelection().toString() !== "";
  };
  window.setInterval(function () {
    if (document.visibilityState === "visible" && !busy()) { window.location.reload(); }
  }, every * 1000);
})();
