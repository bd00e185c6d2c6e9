"""How well a lens predicts the model's final distribution (`mlsae-train eval-lens`): per layer, the mean over
held-out trainable tokens of KL(p_final || p_l) for the tuned lens (the trained translators) and for the logit lens
(the identity), in nats. Writes OUT/lens_eval.json (format `mlsae-lens-eval`) and OUT/lens_kl.png.

The figure is drawn here, with matplotlib imported only when it is drawn, because the analysis package (which owns
the other figures) sits downstream of this one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from mlsae_cache.core.devices import resolve_device
from mlsae_cache.core.errors import InputError
from mlsae_cache.core.outputs import output_dir
from mlsae_cache.core.progress import Progress, no_progress
from mlsae_cache.core.records import Record
from mlsae_cache.store import Cache, open_cache
from mlsae_train.lens import Lens, check_lens_fits, load_lens
from mlsae_train.lens_head import AUTOCASTS, LensHead, kl_to_final, load_head

log = logging.getLogger(__name__)

LENS_EVAL_JSON, LENS_KL_PNG = "lens_eval.json", "lens_kl.png"


@dataclass(frozen=True)
class LensEvalConfig:
    """Everything `mlsae-train eval-lens` takes; CLI options map one-to-one onto these fields.

    start: first token evaluated (None: the first token the lens's training held out, else 0); out: a directory
    for lens_eval.json and lens_kl.png (None: print only); autocast: none (float32, the default) or bf16.
    """

    lens: Path
    cache: Path
    out: Path | None = None
    start: int | None = None
    stop: int | None = None
    model: str | None = None
    batch_tokens: int = 256
    device: str = "auto"
    autocast: str = "none"
    overwrite: bool = False

    def __post_init__(self) -> None:
        resolve_device(self.device)
        if self.batch_tokens < 1:
            raise InputError(f"--batch-tokens must be at least 1, got {self.batch_tokens}")
        if self.autocast not in AUTOCASTS:
            raise InputError(f"--autocast {self.autocast!r} is not one of {', '.join(AUTOCASTS)}")


@dataclass(frozen=True)
class LensEvalResult(Record):
    """Per-layer mean KL(p_final || p_l) in nats of the tuned lens and the logit lens over `n_tokens` tokens of
    [start, stop); `held_out` says whether the lens was trained on none of them (None: unknown, another cache)."""

    FORMAT: ClassVar[str] = "mlsae-lens-eval"
    VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "lens evaluation"
    REMAKE: ClassVar[str] = "write one with `mlsae-train eval-lens LENS CACHE --out DIR`"

    layer: list[int]
    kl_tuned: list[float]
    kl_logit: list[float]
    n_tokens: int
    start: int
    stop: int
    held_out: bool | None = None
    lens: str | None = None
    cache: str | None = None

    def table(self) -> str:
        """The per-layer KL of both lenses as aligned text."""
        lines = [f"{'layer':>5}  {'tuned KL':>10}  {'logit KL':>10}"]
        rows = zip(self.layer, self.kl_tuned, self.kl_logit, strict=True)
        lines += [f"{a:>5}  {b:>10.4f}  {c:>10.4f}" for a, b, c in rows]
        held = {True: "held out from the lens's training", False: "including training tokens", None: "tokens"}
        lines.append(
            f"nats per token over {self.n_tokens:,} trainable tokens in [{self.start:,}, {self.stop:,}) "
            f"({held[self.held_out]})"
        )
        return "\n".join(lines)


@torch.no_grad()
def lens_kl(
    lens: Lens, head: LensHead, cache: Cache, start: int, stop: int, batch_tokens: int, progress: Progress
) -> tuple[np.ndarray, np.ndarray, int]:
    """Summed KL per lens layer of the tuned lens and of the identity ([L] float64 each), and the tokens counted,
    over the trainable tokens of [start, stop)."""
    device = lens.weight.device
    positions = [cache.layer_index(layer) for layer in lens.layers]
    tuned, logit, n = np.zeros(len(lens.layers)), np.zeros(len(lens.layers)), 0
    trainable = cache.trainable(start, stop)
    for a in range(start, stop, batch_tokens):
        b = min(a + batch_tokens, stop)
        h = torch.from_numpy(cache.activations(a, b)[trainable[a - start : b - start]]).to(device)
        if len(h):
            target = head.log_probs(h[:, -1])
            for i, pos in enumerate(positions):
                tuned[i] += float(kl_to_final(head, target, lens.translate(h[:, pos], i)).double().sum())
                logit[i] += float(kl_to_final(head, target, h[:, pos]).double().sum())
            n += len(h)
        progress(b - a)
    if n == 0:
        raise InputError(f"no trainable token in [{start}, {stop}) of {cache.path} (widen --start/--stop)")
    return tuned, logit, n


def _range(cfg: LensEvalConfig, lens: Lens, cache: Cache) -> tuple[int, int, bool | None]:
    """The token range and whether the lens held it out (start default: the first held-out token)."""
    same = lens.meta.get("cache_fingerprint") == cache.meta.fingerprint
    held_out = lens.meta.get("train_tokens") or cache.n_tokens  # None: trained on every token
    start = cfg.start if cfg.start is not None else (held_out if same else 0)
    start, stop = cache.token_range(start, cfg.stop)
    if start >= stop:
        raise InputError(
            f"token range [{start}, {stop}) of {cache.path} is empty: the lens was trained on every token of it "
            "(train it with --train-tokens to hold some out, or give --start)"
        )
    return start, stop, (start >= held_out) if same else None


def run_eval_lens(cfg: LensEvalConfig, progress: Progress = no_progress) -> LensEvalResult:
    """Evaluate the lens on the cache (tokens done go to `progress`); write OUT when given."""
    device = resolve_device(cfg.device)
    lens, cache = load_lens(cfg.lens, device), open_cache(cfg.cache)
    check_lens_fits(lens, cache, lens.layers)
    head = load_head(cache, cfg.model, device, cfg.autocast).to(device)
    if lens.meta.get("head_fingerprint") not in (None, head.fingerprint):
        raise InputError(
            f"lens {cfg.lens} was trained with another model's final norm and LM head than {head.name}'s (pass the "
            "model it was trained with as --model, or train a lens for this model)"
        )
    start, stop, held_out = _range(cfg, lens, cache)
    progress(0, total=stop - start)
    tuned, logit, n = lens_kl(lens, head, cache, start, stop, cfg.batch_tokens, progress)
    result = LensEvalResult(
        list(lens.layers), (tuned / n).tolist(), (logit / n).tolist(), n, start, stop, held_out, str(cfg.lens),
        str(cfg.cache),
    )  # fmt: skip
    if cfg.out is not None:
        inputs = {"lens": str(Path(cfg.lens).resolve()), "cache": str(Path(cfg.cache).resolve())}
        with output_dir(Path(cfg.out), "eval-lens", inputs, cfg.overwrite) as tmp:
            result.write(tmp / LENS_EVAL_JSON)
            draw_lens_kl(result, tmp / LENS_KL_PNG)
    return result


def draw_lens_kl(result: LensEvalResult, path: Path) -> Path:
    """KL by layer of both lenses (log scale; a zero is drawn at the axis floor)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    floor = 1e-4
    for values, label, style in ((result.kl_logit, "logit lens", "o--"), (result.kl_tuned, "tuned lens", "s-")):
        ax.plot(result.layer, np.maximum(values, floor), style, label=label, markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("block (residual stream after it)")
    ax.set_ylabel(f"KL(p_final || p_layer), nats/token\n(0 drawn at {floor:g})")
    ax.set_title(f"Lens KL by layer, {result.n_tokens:,} tokens [{result.start:,}, {result.stop:,})", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
