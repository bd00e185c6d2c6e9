"""Tuned-lens translators (docs/METHOD.md, "The tuned lens"): the `mlsae-lens` format and applying a lens.

A lens holds, for each of its blocks l, an affine translator of the residual stream after block l,

    T_l(h) = h + A_l h + b_l,        T_l^-1(y) = (I + A_l)^-1 (y - b_l),

trained (lens_train.py) so that the model's final norm and unembedding of T_l(h_l) predict the model's own final
distribution. A lens MLSAE encodes T_l(h_l) and decodes in the same space; splicing puts back T_l^-1(x^).

A lens directory (written by `mlsae-train lens`) holds

    lens.safetensors  float32 tensors `weight` [n_layers, d_model, d_model] (A_l, in the order of `layers`) and
                      `bias` [n_layers, d_model] (b_l); its safetensors metadata carries the format and a save_id
    cfg.json          format "mlsae-lens", version 1, d_model, layers, save_id, weights_crc32c (of lens.safetensors
                      as written), the model and cache it was trained on (model record, head fingerprint, cache
                      fingerprint) and its training settings; `crc32c` seals the keys that decide the numbers

An SAE directory fitted with `fit --lens` carries a copy of the lens in its subdirectory `lens/`, and its cfg.json
names it under `tuned_lens` (fingerprint, layers, source), so every consumer applies it without being told: call
`lens_of(sae_dir, sae_cfg)` and, for the rows of block layers[i], `lens.translate(x, i)` / `untranslate`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mlsae_cache.core.checksums import check_weights_record, file_crc32c, seal
from mlsae_cache.core.errors import CorruptError, InputError, NotFoundError, StoreError
from mlsae_cache.core.outputs import replace_file
from mlsae_cache.core.paths import what_is
from mlsae_cache.core.records import check_format, write_json_atomically
from mlsae_cache.core.verifying import Verified
from mlsae_cache.store import Cache

FORMAT = "mlsae-lens"
VERSION = 1
KIND = "lens"
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "lens.safetensors"
SAE_LENS_DIR = "lens"
"""The subdirectory of an SAE directory that holds the lens it was fitted with."""
SAE_CFG_KEY = "tuned_lens"
"""The key of an SAE's cfg.json that names its lens: {"fingerprint", "layers", "source"} (null: no lens)."""
REMAKE = "give the OUT of `mlsae-train lens CACHE OUT`"
WEIGHTS_CRC = "weights_crc32c"
SEALED_KEYS = ("format", "version", "d_model", "layers", "save_id", WEIGHTS_CRC)
"""The keys of cfg.json whose values decide what a loaded lens computes, sealed with a crc32c."""
RETRAIN = "train the lens again, or restore it from a copy"
_WEIGHT, _BIAS = "weight", "bias"

Positions = int | Tensor
"""Which lens layer each row belongs to: one position into `Lens.layers` for all rows, or a [B] int tensor."""


class Lens:
    """Translators of blocks `layers`: weight [L, d, d] (A_l), bias [L, d] (b_l), float32, on one device.

    `translate(x, positions)` and `untranslate(y, positions)` take rows x [B, d] (any float dtype) and return
    float32 [B, d]; positions index `layers` (use `select` to line them up with another list of blocks).
    """

    def __init__(self, layers: Sequence[int], weight: Tensor, bias: Tensor, meta: dict[str, Any] | None = None) -> None:
        n, d = len(layers), bias.shape[-1]
        if tuple(weight.shape) != (n, d, d) or tuple(bias.shape) != (n, d):
            raise StoreError(f"lens tensors {tuple(weight.shape)}, {tuple(bias.shape)} do not fit {n} layers of {d}")
        self.layers = tuple(int(layer) for layer in layers)
        self.weight, self.bias = weight.float(), bias.float()
        self.meta = dict(meta or {})
        self._inverse: Tensor | None = None

    @classmethod
    def identity(cls, layers: Sequence[int], d_model: int) -> Lens:
        """The logit lens: every translator is the identity (A_l = 0, b_l = 0)."""
        return cls(layers, torch.zeros(len(layers), d_model, d_model), torch.zeros(len(layers), d_model))

    @property
    def d_model(self) -> int:
        return int(self.bias.shape[-1])

    @property
    def fingerprint(self) -> str | None:
        """The content hash of the lens file it was read from (None for a lens built in memory)."""
        return self.meta.get("fingerprint")

    def select(self, layers: Sequence[int]) -> Lens:
        """This lens for blocks `layers`, in that order (position i then means block layers[i])."""
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise InputError(
                f"the lens has no translator for blocks {missing} (it covers {list(self.layers)}); train a lens on "
                "a cache holding them"
            )
        idx = torch.tensor([self.layers.index(layer) for layer in layers], dtype=torch.long)
        return Lens(layers, self.weight[idx], self.bias[idx], self.meta)

    def to(self, device: torch.device | str) -> Lens:
        return Lens(self.layers, self.weight.to(device), self.bias.to(device), self.meta)

    def inverse(self) -> Tensor:
        """(I + A_l)^-1 for every layer: [L, d, d] float32, computed once in float64."""
        if self._inverse is None:
            eye = torch.eye(self.d_model, dtype=torch.float64, device=self.weight.device)
            self._inverse = torch.linalg.inv(eye + self.weight.double()).float()
        return self._inverse

    def translate(self, x: Tensor, positions: Positions) -> Tensor:
        """T_l(x) = x + A_l x + b_l for rows x [B, d] of layer positions `positions`: [B, d] float32."""
        return _per_layer(x, positions, lambda rows, p: rows + rows @ self.weight[p].T + self.bias[p])

    def untranslate(self, y: Tensor, positions: Positions) -> Tensor:
        """T_l^-1(y) = (I + A_l)^-1 (y - b_l) for rows y [B, d]: [B, d] float32."""
        inverse = self.inverse()
        return _per_layer(y, positions, lambda rows, p: (rows - self.bias[p]) @ inverse[p].T)


def _per_layer(x: Tensor, positions: Positions, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    """fn(rows of one layer position, position) for each position present; float32 [B, d] in x's row order."""
    x = x.float()
    if isinstance(positions, int):
        return fn(x, positions)
    out = torch.empty_like(x)
    for p in torch.unique(positions).tolist():
        rows = positions == p
        out[rows] = fn(x[rows], int(p))
    return out


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, first 16 hex digits (what an SAE directory records of its lens)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def save_lens(lens: Lens, out: Path | str, cfg: dict[str, Any]) -> Path:
    """Write `lens` to directory `out` (created if needed): tensors first, cfg.json last, each atomically, so an
    interrupted save is never read as a lens (see `load_lens`). `cfg` adds keys to cfg.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    tensors = {_WEIGHT: lens.weight.detach().cpu().contiguous(), _BIAS: lens.bias.detach().cpu().contiguous()}
    meta = {"format": FORMAT, "save_id": save_id}
    replace_file(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=meta))
    core = {"format": FORMAT, "version": VERSION, "d_model": lens.d_model, "layers": list(lens.layers)}
    record = {**core, **cfg, "save_id": save_id, WEIGHTS_CRC: file_crc32c(out / WEIGHTS_NAME)}
    write_json_atomically(out / CFG_NAME, seal(record, SEALED_KEYS))
    return out


def read_lens_cfg(path: Path | str) -> dict[str, Any]:
    """The checked cfg.json of the lens directory `path`; a one-line error for anything else."""
    path = Path(path)
    cfg_path = path / CFG_NAME
    if not path.exists():
        raise NotFoundError(f"lens {path} does not exist ({REMAKE})")
    if not cfg_path.is_file():
        raise StoreError(f"{path} is {what_is(path)}, not a lens ({REMAKE})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{cfg_path} is not valid JSON: {e} ({REMAKE})") from e
    if not isinstance(cfg, dict):
        raise StoreError(f"{cfg_path} holds no object ({REMAKE})")
    check_format(cfg, FORMAT, VERSION, path, KIND, REMAKE.replace("give", "train one with"))
    missing = [key for key in ("d_model", "layers", "save_id") if key not in cfg]
    if missing:
        raise StoreError(f"{cfg_path} lacks {', '.join(missing)} ({REMAKE})")
    return cfg


def load_lens(path: Path | str, device: torch.device | str = "cpu") -> Lens:
    """The lens in directory `path` (written by `save_lens`); its meta is cfg.json plus `fingerprint` and `path`."""
    path = Path(path)
    cfg = read_lens_cfg(path)
    w_path = path / WEIGHTS_NAME
    try:
        with safe_open(str(w_path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iter
    except Exception as e:  # missing, truncated or foreign file
        raise StoreError(f"cannot read {w_path}: {e} (train the lens again)") from e
    if meta.get("save_id") != cfg["save_id"]:
        raise CorruptError(f"{w_path} does not belong to {path / CFG_NAME}: a save was interrupted (train it again)")
    if set(tensors) != {_WEIGHT, _BIAS} or tensors[_WEIGHT].dtype != torch.float32:
        raise StoreError(f"{w_path} holds {sorted(tensors)}, not float32 {_WEIGHT} and {_BIAS} ({REMAKE})")
    check_checksums(path, cfg)
    info = {**cfg, "fingerprint": file_fingerprint(w_path), "path": str(path)}
    return Lens(cfg["layers"], tensors[_WEIGHT], tensors[_BIAS], info).to(device)


def check_checksums(path: Path, cfg: dict[str, Any]) -> list[str]:
    """Check the seal of cfg.json (`cfg`, read from lens directory `path`) and the crc32c it records of
    lens.safetensors; CorruptError naming the file that does not match. Returns notes on what carries no checksum."""
    return check_weights_record(
        cfg, path / CFG_NAME, path / WEIGHTS_NAME, WEIGHTS_CRC, SEALED_KEYS, RETRAIN, "an older lens"
    )


def verify_lens(path: Path) -> Verified:
    """Check the lens directory `path` whole: cfg.json's seal and the crc32c of lens.safetensors first (so any damage
    is a CorruptError naming the file), then a full load."""
    notes = check_checksums(path, read_lens_cfg(path))
    try:
        load_lens(path)
    except StoreError as e:  # damage in a lens without checksums, found by reading it
        raise CorruptError(str(e)) from e
    return Verified(KIND, 2, "files", tuple(notes))


# ---------------------------------------------------------------------------------------------- lens and data


def model_key(model: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a model in a cache's record: name, revision, GGUF file, blocks and width."""
    return tuple(model.get(k) for k in ("name", "revision", "gguf_file", "n_layers", "d_model"))


def check_lens_fits(lens: Lens, cache: Cache, layers: Sequence[int]) -> None:
    """Refuse an unfinished lens, one for another model than the cache's or of another width, or one without a
    translator for one of `layers`."""
    where = lens.meta.get("path", "the lens")
    if not lens.meta.get("finished", True):
        raise InputError(f"lens {where} is unfinished (re-run the `mlsae-train lens` command that made it)")
    if lens.d_model != cache.d_model:
        raise InputError(
            f"lens {where} has d_model {lens.d_model} but cache {cache.path} has {cache.d_model} (train a lens on a "
            "cache of this model with `mlsae-train lens`)"
        )
    model = lens.meta.get("model") or {}
    if model and model_key(model) != model_key(cache.meta.model):
        raise InputError(
            f"lens {where} was trained for model {model.get('name')!r}, but cache {cache.path} holds "
            f"{cache.meta.model.get('name')!r} (train a lens on a cache of this model)"
        )
    missing = [layer for layer in layers if layer not in lens.layers]
    if missing:
        raise InputError(
            f"lens {where} has no translator for blocks {missing} (it covers {list(lens.layers)}); train the lens on "
            "a cache holding every block you fit"
        )


# ---------------------------------------------------------------------------------------------- SAE directories


def has_lens(sae_cfg: dict[str, Any]) -> bool:
    """Whether the SAE whose cfg.json is `sae_cfg` was fitted on lens-translated rows (cheap: reads nothing)."""
    return bool(sae_cfg.get(SAE_CFG_KEY))


def sae_lens_record(lens: Lens) -> dict[str, Any]:
    """What an SAE's cfg.json records of the lens it was fitted with (also compared when a fit resumes)."""
    return {"fingerprint": lens.fingerprint, "layers": list(lens.layers), "source": lens.meta.get("path")}


def carry_lens(lens: Lens, sae_dir: Path | str) -> None:
    """Copy the lens files (read from lens.meta["path"]) into `sae_dir`/lens, each atomically, cfg.json last."""
    src, dst = Path(lens.meta["path"]), Path(sae_dir) / SAE_LENS_DIR
    if dst.is_dir() and (dst / WEIGHTS_NAME).is_file() and file_fingerprint(dst / WEIGHTS_NAME) == lens.fingerprint:
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, CFG_NAME):
        replace_file(dst / name, partial(shutil.copyfile, src / name))


def lens_of(sae_dir: Path | str, sae_cfg: dict[str, Any], device: torch.device | str = "cpu") -> Lens | None:
    """The lens the SAE directory carries (None for a plain SAE); CorruptError when the copy is not the one its
    cfg.json names. The result covers the lens's own blocks: `select` the ones being processed."""
    record = sae_cfg.get(SAE_CFG_KEY)
    if not record:
        return None
    path = Path(sae_dir) / SAE_LENS_DIR
    if not (path / CFG_NAME).is_file():
        raise StoreError(f"SAE {sae_dir} was fitted with a lens, but {path} is missing (copy the SAE directory whole)")
    lens = load_lens(path, device)
    if lens.fingerprint != record.get("fingerprint"):
        raise CorruptError(
            f"the lens in {path} (fingerprint {lens.fingerprint}) is not the one SAE {sae_dir} was fitted with "
            f"({record.get('fingerprint')}); copy the SAE directory whole, or fit it again"
        )
    return lens
