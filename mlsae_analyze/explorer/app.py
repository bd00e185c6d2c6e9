"""The explorer's FastAPI application: the JSON API (`/api/v1`, payloads in api.py), the pages (HTML shells that
load the hand-written modules in static/), OpenAPI at /openapi.json with a page for it at /docs (FastAPI's own
docs page would load its scripts from a CDN), and the guards: a token where one is set, no request body over
MAX_BODY_BYTES, a content security policy that lets a page load nothing from outside the server's origin, and
409 with the rebuild command from every data route when a store moved since the index was built.
"""

from __future__ import annotations

import html
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

import mlsae_analyze.explorer.api as api
import mlsae_analyze.explorer.views as views
from mlsae_analyze.explorer.live import PromptTooLong
from mlsae_analyze.explorer.liveviews import LiveViews
from mlsae_analyze.explorer.store import ExplorerStores, Stale
from mlsae_cache.core.errors import MlsaeError, NotFoundError

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 65536
TOKEN_COOKIE = "mlsae_explorer_token"
API_VERSION = "1"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
NO_LIVE_MODEL = (
    "this explorer serves its stores only: prompts, logits, steering and generation need a live model (restart it "
    "with `mlsae-analyze explore INDEX --model cache`)"
)
PAGES = {
    "overview": "Overview",
    "latents": "Latents",
    "latent": "Latent",
    "doc": "Context",
    "prompt": "Prompt",
    "docs": "API",
}

Handler = Callable[[Request], Awaitable[Response]]


def _problem(status: int, detail: str, rebuild: str | None = None) -> JSONResponse:
    return JSONResponse(api.Problem(detail=detail, rebuild=rebuild).model_dump(exclude_none=True), status_code=status)


def _install_errors(app: FastAPI) -> None:
    async def stale(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Stale)
        return _problem(409, f"the index is out of date: {exc}", exc.rebuild)

    async def failed(request: Request, exc: Exception) -> Response:
        status = 404 if isinstance(exc, NotFoundError) else 413 if isinstance(exc, PromptTooLong) else 422
        return _problem(status, " ".join(str(exc).split()))

    app.add_exception_handler(Stale, stale)
    app.add_exception_handler(MlsaeError, failed)


def _install_guards(app: FastAPI, token: str | None) -> None:
    async def guard(request: Request, call_next: Handler) -> Response:
        length = request.headers.get("content-length") or "0"
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return _problem(413, f"the request body is over {MAX_BODY_BYTES} bytes (or its length is not a number)")
        given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
        bearer = request.headers.get("authorization", "")
        given = given or (bearer[7:] if bearer.lower().startswith("bearer ") else None)
        if token is not None and not (given and secrets.compare_digest(given, token)):
            return _problem(401, "this explorer needs its token: open the URL that `explore` printed")
        response = await call_next(request)
        if token is not None and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    app.middleware("http")(guard)


def _data_routes(stores: ExplorerStores, live: bool) -> APIRouter:
    router = APIRouter(prefix="/api/v1", dependencies=[Depends(stores.check_fresh)])

    @router.get("/meta")
    def meta() -> api.Meta:
        """The model, the SAE's size, the stores and what the index holds."""
        return views.meta_view(stores, live)

    @router.get("/latent/{j}")
    def latent(j: int) -> api.Latent:
        """Everything about latent j but its examples."""
        return views.latent_view(stores, j)

    @router.get("/latent/{j}/examples")
    def examples(
        j: int,
        layer: str = Query("all", description="'all' or a block index."),
        kind: Literal["top", "quantile", "random"] = "top",
        offset: int = Query(0, ge=0),
        limit: int = Query(20, ge=1, le=100),
        context: int = Query(8, ge=0, le=32, description="Tokens shown either side."),
    ) -> api.Examples:
        """A page of latent j's examples in one tab, each with its window of tokens."""
        return views.examples_view(stores, j, layer, kind, offset, limit, context)

    @router.get("/latents")
    def latents(
        sort: str = "density",
        desc: bool = True,
        offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=500),
        min_density: float | None = None,
        min_layer: float | None = None,
        max_layer: float | None = None,
        q: str | None = Query(None, max_length=200, description="Text in the top logit token."),
    ) -> api.LatentTable:
        """A page of the latents table, filtered and sorted."""
        return views.table_view(stores, sort, desc, offset, limit, min_density, min_layer, max_layer, q)

    @router.get("/overview")
    def overview(width: int = Query(1200, ge=1, le=4096)) -> api.Overview:
        """P_j(l) of every latent that fires, by mean layer."""
        return views.overview_view(stores, width)

    @router.get("/doc/{d}")
    def doc(d: int, latent: int | None = None, position: int | None = None) -> api.Doc:
        """Context window d, with one latent's activations and the latents at one token."""
        return views.doc_view(stores, d, latent, position)

    return router


def _bounded(body: api.PromptRequest) -> None:
    """413 for a text or an edit list over the limits."""
    if len(body.text) > api.MAX_TEXT_CHARS:
        raise HTTPException(413, f"the text is over {api.MAX_TEXT_CHARS} characters")
    if len(getattr(body, "edits", [])) > api.MAX_EDITS:
        raise HTTPException(413, f"more than {api.MAX_EDITS} edits")


def _live(live: LiveViews | None, body: api.PromptRequest) -> LiveViews:
    """The live model for a request within the limits; 503 when the server runs without one."""
    _bounded(body)
    if live is None:
        raise HTTPException(503, NO_LIVE_MODEL)
    return live


def _live_routes(live: LiveViews | None) -> APIRouter:
    """The routes that run the model. Plain functions: FastAPI runs them in its thread pool, off the event loop,
    and the live model's lock serialises them."""
    router = APIRouter(prefix="/api/v1/prompt", responses={413: {"model": api.Problem}, 503: {"model": api.Problem}})

    @router.post("")
    def prompt(body: api.PromptLayersRequest) -> api.Prompt:
        """The prompt's tokens and top-k latents at every layer and token, with the per-layer FVU."""
        return _live(live, body).prompt(body)

    @router.post("/delta_ce")
    def delta_ce(body: api.PromptRequest) -> api.PromptDeltaCe:
        """The prompt's delta CE with each layer's reconstruction spliced in, in turn (one re-run per layer)."""
        return _live(live, body).delta_ce(body)

    @router.post("/logits")
    def logits(body: api.LogitsRequest) -> api.Logits:
        """Top logits at a position, clean and with the reconstruction spliced in at a layer."""
        return _live(live, body).logits(body)

    @router.post("/steer")
    def steer(body: api.SteerRequest) -> api.Steer:
        """Logit changes at every position from steering edits."""
        return _live(live, body).steer(body)

    @router.post("/generate")
    def generate(body: api.GenerateRequest) -> api.Generate:
        """Default and steered continuations, drawn with one seed."""
        return _live(live, body).generate(body)

    return router


def _page(request: Request, page: str, status: int = 200) -> HTMLResponse:
    shell = (STATIC / "page.html").read_text(encoding="utf-8")
    base = html.escape(request.scope.get("root_path", "").rstrip("/") + "/")
    filled = shell.replace("__BASE__", base).replace("__PAGE__", page).replace("__TITLE__", PAGES[page])
    return HTMLResponse(filled, status_code=status)


def _page_routes(stores: ExplorerStores) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def overview(request: Request) -> HTMLResponse:
        return _page(request, "overview")

    @router.get("/latents")
    def latents(request: Request) -> HTMLResponse:
        return _page(request, "latents")

    @router.get("/latent/{j}")
    def latent(request: Request, j: int) -> HTMLResponse:
        return _page(request, "latent", 200 if 0 <= j < stores.index.meta.n_latents else 404)

    @router.get("/doc/{d}")
    def doc(request: Request, d: int) -> HTMLResponse:
        return _page(request, "doc", 200 if 0 <= d < stores.index.meta.n_docs else 404)

    @router.get("/prompt")
    def prompt(request: Request) -> HTMLResponse:
        return _page(request, "prompt")

    @router.get("/docs")
    def docs(request: Request) -> HTMLResponse:
        return _page(request, "docs")

    return router


def build_app(stores: ExplorerStores, token: str | None = None, live: LiveViews | None = None) -> FastAPI:
    """The application over opened stores; `token`: required of every request where given; `live`: the model
    behind the live routes (they answer 503 without one). Behind a proxy, the server passes the path prefix in
    each request's scope (`root_path`), and the pages' links follow it."""
    app = FastAPI(
        title="mlsae explorer",
        version=API_VERSION,
        docs_url=None,
        redoc_url=None,
        responses={404: {"model": api.Problem}, 409: {"model": api.Problem}, 422: {"model": api.Problem}},
    )
    app.state.stores, app.state.live = stores, live
    _install_errors(app)
    _install_guards(app, token)
    app.include_router(_data_routes(stores, live is not None))
    app.include_router(_live_routes(live))
    app.include_router(_page_routes(stores))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
