// The results page (/results?id=...): the server rendered each card as it stood; this rebuilds
// each one from the JSON API (card.js) and polls the unfinished ones until they are done or failed.
"use strict";

// Staggered, so that 50 cards do not spend a client's status rate limit in one burst.
const STAGGER_MS = 25;
document.querySelectorAll(".card[data-job]").forEach((card, i) => {
  window.cxrCard.adopt(card);
  setTimeout(() => window.cxrCard.poll(card, 0), i * STAGGER_MS);
});
