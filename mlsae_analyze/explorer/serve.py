"""`mlsae-analyze explore`: open an index and the stores it names, listen (on 127.0.0.1 unless told otherwise, and
on another address only with a token), and serve the app until Ctrl-C."""

from __future__ import annotations

import getpass
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsae_cache.core.errors import InputError


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ExploreConfig:
    """Everything `mlsae-analyze explore` takes; CLI options map one-to-one onto these fields.

    `index`: the OUT of `mlsae-analyze index`. `latents`, `variance`, `sae`, `cache`: read these stores instead of
    the paths the index recorded (moved stores; their fingerprints must still match). `model`: run this model
    ("cache": the one the cache was harvested from) on `device` with the SAE, which turns on the live routes and
    the prompt page; prompts are limited to `max_prompt_tokens` tokens. `host`/`port`: where to listen (port 0:
    any free port); another host than loopback needs `token`, which every request must then carry. `root_path`:
    the path prefix of a proxy in front.
    """

    index: Path
    model: str | None = None
    latents: Path | None = None
    variance: Path | None = None
    sae: Path | None = None
    cache: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    root_path: str = ""
    device: str = "auto"
    max_prompt_tokens: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.max_prompt_tokens, bool) or not 2 <= self.max_prompt_tokens <= 4096:
            raise InputError(f"--max-prompt-tokens must be in [2, 4096], got {self.max_prompt_tokens!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InputError(f"--port must be an integer in [0, 65535], got {self.port!r}")
        if self.token is not None and len(self.token) < 8:
            raise InputError("--token must be at least 8 characters (use a random one, e.g. `openssl rand -hex 16`)")
        if not is_loopback(self.host) and self.token is None:
            raise InputError(
                f"--host {self.host} would let other machines read your stores: pass --token SECRET as well, or keep "
                "the default 127.0.0.1 and reach it with `ssh -L`"
            )
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise InputError(f"--root-path {self.root_path!r} must start with / and not end with one, like /explorer")

    def overrides(self) -> dict[str, Path | None]:
        return {"latents": self.latents, "variance": self.variance, "sae": self.sae, "cache": self.cache}


def create_app(cfg: ExploreConfig) -> Any:
    """Open the index and its stores (one-line errors for anything missing or stale-beyond-use) and build the app."""
    from mlsae_analyze.explorer.app import build_app
    from mlsae_analyze.explorer.store import ExplorerStores

    stores = ExplorerStores(Path(cfg.index), cfg.overrides(), None if cfg.model == "cache" else cfg.model)
    return build_app(stores, cfg.token, live_views(cfg, stores) if cfg.model else None)


def live_views(cfg: ExploreConfig, stores: Any) -> Any:
    """The live model of cfg.model with the index's SAE, behind the live routes."""
    from mlsae_analyze.explorer.live import load_live_model
    from mlsae_analyze.explorer.liveviews import LiveViews
    from mlsae_cache.core.devices import resolve_device
    from mlsae_cache.store import read_meta
    from mlsae_train.checkpoint import load_sae
    from mlsae_train.lens import lens_of

    assert cfg.model is not None
    sae, sae_cfg = load_sae(stores.paths["sae"], resolve_device(cfg.device), allow_unfinished=True)
    lens = lens_of(stores.paths["sae"], sae_cfg)
    cache_meta = read_meta(stores.paths["cache"])
    layers = stores.index.meta.layers
    live = load_live_model(cfg.model, cfg.device, sae, layers, cache_meta, cfg.max_prompt_tokens, lens)
    return LiveViews(live, stores.index)


def stale_warning(app: Any) -> str | None:
    """What to tell the user when a store moved since the index was built (the pages then show it too)."""
    from mlsae_analyze.explorer.store import Stale

    try:
        app.state.stores.check_fresh()
    except Stale as e:
        return f"warning: the index is out of date: {e}; rebuild it with: {e.rebuild}"
    return None


def listen(cfg: ExploreConfig) -> socket.socket:
    """A socket listening on cfg.host and cfg.port (InputError when it cannot, e.g. a port in use)."""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
        sock.listen(128)  # connections wait in the backlog from now on, while uvicorn starts
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); choose another --port") from e
    return sock


def machine_name() -> str:
    """This machine's name as others reach it: its fully qualified name, or its host name where that is only
    'localhost'."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if fqdn.startswith("localhost") else fqdn


def announce(cfg: ExploreConfig, port: int) -> list[str]:
    """What to print: the URL, and how to reach it from a laptop."""
    query = f"?token={cfg.token}" if cfg.token else ""
    if is_loopback(cfg.host):
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        lines = [f"explorer: http://{host}:{port}/{query}"]
        user, machine = getpass.getuser(), machine_name()
        lines.append(
            f"from your laptop: ssh -N -L {port}:localhost:{port} {user}@{machine}, then open "
            f"http://localhost:{port}/{query}"
        )
    else:
        host = machine_name() if cfg.host in ("0.0.0.0", "::") else cfg.host
        lines = [f"explorer: http://{host}:{port}/{query} (listening on {cfg.host}; every request needs the token)"]
    if cfg.root_path:
        lines.append(f"pages link to {cfg.root_path}/ : open them through the proxy that serves that path")
    return lines


def serve(app: Any, sock: socket.socket, root_path: str = "") -> None:
    """Serve `app` on the bound socket until Ctrl-C (uvicorn, plain HTTP; `root_path`: a proxy's path prefix)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, ws="none", lifespan="off", root_path=root_path)
    uvicorn.Server(config).run(sockets=[sock])
