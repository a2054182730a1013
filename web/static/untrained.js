// Marks the answer of a model version that was never fine-tuned (result.model_trained false):
// its label means nothing, and the card says so before anything else. Kept apart from
// results.js, which calls window.cxrUntrained.mark(card, result) once per finished result.
"use strict";

(function () {
  const TEXT = "Untrained model — not a diagnosis. This version was never fine-tuned; " +
    "its label and probabilities are meaningless.";

  function mark(card, result) {
    if (!card || !result) return false;
    const existing = card.querySelector(".untrained-mark");
    if (result.model_trained !== false) {
      if (existing) existing.remove();
      card.classList.remove("untrained");
      return false;
    }
    card.classList.add("untrained");
    if (existing) return true;
    const note = document.createElement("p");
    note.className = "untrained-mark";
    note.setAttribute("role", "note");
    note.textContent = TEXT;
    const status = card.querySelector(".status");
    if (status) status.before(note);
    else card.prepend(note);
    return true;
  }

  window.cxrUntrained = { mark: mark, TEXT: TEXT };
})();
