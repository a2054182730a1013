// The results page (/results?id=...): the server rendered each card as it stood; this rebuilds
// each one from the JSON API (card.js) and polls the unfinished ones until they are done or failed.
"use strict";

document.querySelectorAll(".card[data-job]").forEach((card) => window.cxrCard.poll(window.cxrCard.adopt(card), 0));
