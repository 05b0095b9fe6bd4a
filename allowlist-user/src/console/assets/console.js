// Progressive: every page works without this file. It adds copy buttons
// for secrets shown once, and shows the prefix field only for ranges.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const field = document.getElementById(button.dataset.copy);
      if (!field) return;
      field.select();
      try {
        await navigator.clipboard.writeText(field.value);
        button.textContent = "Copied";
      } catch (_) {
        // Clipboard access needs a secure context and permission; the
        // value is selected, so Ctrl+C still works.
        button.textContent = "Selected: press Ctrl+C";
      }
    });
  }
  const kind = document.getElementById("kind");
  const prefix = document.getElementById("prefix");
  if (kind && prefix) {
    const sync = () => {
      const range = kind.value.endsWith("-range");
      prefix.disabled = !range;
      prefix.required = range;
      prefix.placeholder = kind.value.startsWith("ipv6") ? "48" : "24";
    };
    kind.addEventListener("change", sync);
    sync();
  }
});
