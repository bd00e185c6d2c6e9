// Entry point of every page: the shell's header, then the page's own module (named by <body data-page>).
import { ApiError, h, initShell, showProblem } from "./common.js";

const page = document.body.dataset.page;
initShell(page);
const main = document.getElementById("main");
try {
  const module = await import(`./${page}.js`);
  await module.render(main);
} catch (error) {
  const stale = error instanceof ApiError && error.status === 409;
  main.replaceChildren(h("p", { class: "muted" }, stale ? "Rebuild the index with the command above, then reload this page." : "Nothing to show."));
  showProblem(error);
}
