"""SAE checkpoint directories (format: docs/FORMAT.md) and the converter for reference checkpoints.

A checkpoint directory holds

    sae.safetensors   float32 tensors encoder.weight [n, d], encoder.bias [n], W_dec [n, d], b_dec [d];
                      its safetensors metadata carries format "mlsae-sae" and a random save_id
    cfg.json          format "mlsae-sae", version 1, d_model, n_latents, k, standardize, save_id, weights_crc32c
                      (of sae.safetensors as written), and every key the trainer passed (layers, cache fingerprint,
                      hyperparameters); `crc32c` seals the keys that decide the numbers (SEALED_KEYS)

Crash safety: each file is written to a temporary file in the same directory, fsync'ed, then renamed over
its final name (os.replace is atomic), tensors first and cfg.json last, then the directory is fsync'ed.
So a save interrupted in a new directory leaves no cfg.json (`load_sae` says the checkpoint is
incomplete), and one interrupted while overwriting an older checkpoint leaves new tensors beside the old
cfg.json, whose save_id then differs from the tensors' (`load_sae` raises CorruptError). Either way a
half-written checkpoint is detected, never loaded. A flipped or lost byte of sae.safetensors, or a changed value of a
sealed key of cfg.json, is refused too (CorruptError); a checkpoint without these checksums (written by an older mlsae,
or by hand) loads as it is, and `verify_sae` says that its bytes could not be checked.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlsae_cache.core.checksums import check_weights_record, file_crc32c, seal
from mlsae_cache.core.errors import CorruptError, InputError, LockedError, NotFoundError, StoreError
from mlsae_cache.core.lock import StoreLock
from mlsae_cache.core.outputs import replace_file
from mlsae_cache.core.paths import SWAPPED, is_mlsae, what_is
from mlsae_cache.core.verifying import Verified
from mlsae_train.sae import SaeConfig, TopKSAE
from mlsae_train.state import load_state, state_exists

log = logging.getLogger(__name__)

FORMAT = "mlsae-sae"
VERSION = 1
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
FOREIGN = (
    "give the OUT of `mlsae-train fit`, or bring a SAELens, sparsify or reference checkpoint in with "
    "`mlsae-train import-sae SRC OUT --from saelens|sparsify|reference`"
)
_CORE_KEYS = ("format", "version", "d_model", "n_latents", "k", "standardize")
WEIGHTS_CRC = "weights_crc32c"
SEALED_KEYS = (*_CORE_KEYS, "save_id", WEIGHTS_CRC, "layers")
"""The keys of cfg.json whose values decide what a loaded SAE computes, sealed with a crc32c (other keys, such as
local paths, may be dropped or edited, as `push` does)."""
RESAVE = "save the checkpoint again, or restore it from a copy"


def expected_shapes(cfg: SaeConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint for `cfg`, in file order."""
    d, n = cfg.d_model, cfg.n_latents
    return {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cfg_dict(sae: TopKSAE, extra_cfg: dict[str, Any], save_id: str, weights_crc: str) -> dict[str, Any]:
    core = {
        "format": FORMAT,
        "version": VERSION,
        "d_model": sae.cfg.d_model,
        "n_latents": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "standardize": sae.cfg.standardize,
        "save_id": save_id,
        WEIGHTS_CRC: weights_crc,
    }
    for key, value in extra_cfg.items():
        if key in core and (key in ("save_id", WEIGHTS_CRC) or value != core[key]):
            raise InputError(
                f"extra_cfg[{key!r}] = {value!r} conflicts with the checkpoint's own {key!r} = {core[key]!r} "
                "(drop it from extra_cfg; it is written from the SAE)"
            )
    cfg = {**core, **{k: v for k, v in extra_cfg.items() if k not in core}}
    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"extra_cfg is not JSON-serialisable: {e} (pass str, int, float, bool, list, dict)") from e
    return seal(cfg, SEALED_KEYS)


def save_sae(sae: TopKSAE, out_dir: str | Path, extra_cfg: dict[str, Any] | None = None) -> Path:
    """Write `sae` to the checkpoint directory out_dir (created if needed), atomically; returns out_dir.

    cfg.json gets the SAE's own keys plus every key of extra_cfg (which must be JSON-serialisable and may
    repeat a core key only with the same value). See the module docstring for the write order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    _cfg_dict(sae, dict(extra_cfg or {}), save_id, "")  # refuse a bad extra_cfg before writing anything
    state = sae.state_dict()
    tensors = {name: state[name].detach().to("cpu", torch.float32).contiguous() for name in expected_shapes(sae.cfg)}
    meta = {"format": FORMAT, "save_id": save_id}
    replace_file(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=meta))
    cfg = _cfg_dict(sae, dict(extra_cfg or {}), save_id, file_crc32c(out / WEIGHTS_NAME))
    text = json.dumps(cfg, indent=2, sort_keys=False, allow_nan=False) + "\n"
    replace_file(out / CFG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    _fsync_dir(out)
    log.debug("saved SAE checkpoint %s (save_id %s)", out, save_id)
    return out


def _read_cfg(path: Path) -> dict[str, Any]:
    """Parse and check cfg.json of checkpoint directory `path`."""
    if not path.exists():
        raise NotFoundError(f"SAE checkpoint {path} does not exist (give the OUT of `mlsae-train fit`)")
    cfg_path = path / CFG_NAME
    if not path.is_dir() or not cfg_path.is_file():
        found = what_is(path)
        advice = SWAPPED if is_mlsae(found) else FOREIGN
        raise StoreError(f"{path} is {found}, not an SAE checkpoint ({advice})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{cfg_path} is not valid JSON: {e} (save the checkpoint again)") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise StoreError(f"{cfg_path} has format {got!r}, expected {FORMAT!r} ({FOREIGN})")
    if cfg.get("version") != VERSION:
        raise StoreError(
            f"{cfg_path} has version {cfg.get('version')!r}; this mlsae reads version {VERSION} "
            "(upgrade mlsae, or re-save the checkpoint with this version)"
        )
    missing = [key for key in _CORE_KEYS if key not in cfg]
    if missing:
        raise StoreError(f"{cfg_path} lacks {', '.join(missing)} (save the checkpoint again)")
    return cfg


def _sae_config(cfg: dict[str, Any], where: Path) -> SaeConfig:
    try:
        return SaeConfig(cfg["d_model"], cfg["n_latents"], cfg["k"], cfg["standardize"])
    except InputError as e:
        raise StoreError(f"{where} holds an invalid SAE configuration: {e}") from e


def _read_tensors(path: Path, save_id: str | None, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Load and check sae.safetensors of checkpoint directory `path`. The save ids are compared only where both
    files carry one (a hand-written checkpoint need not)."""
    w_path = path / WEIGHTS_NAME
    if not w_path.is_file():
        raise StoreError(f"{path} has no {WEIGHTS_NAME} (the checkpoint is incomplete: save it again)")
    try:
        with safe_open(str(w_path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iter
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise StoreError(f"{w_path} is not a readable safetensors file: {e} (save the checkpoint again)") from e
    if save_id is not None and meta.get("save_id") not in (None, save_id):
        raise CorruptError(
            f"{w_path} (save_id {meta.get('save_id')!r}) does not belong to {path / CFG_NAME} (save_id "
            f"{save_id!r}): a save was interrupted (save the checkpoint again)"
        )
    if set(tensors) != set(shapes):
        raise StoreError(f"{w_path} holds tensors {sorted(tensors)}, expected {sorted(shapes)} (save it again)")
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != torch.float32:
            raise StoreError(
                f"{w_path}: {name} is {t.dtype} {tuple(t.shape)}, cfg.json implies float32 {shape} "
                "(the files come from different checkpoints: save it again)"
            )
    return tensors


def check_finished(path: Path, cfg: dict[str, Any]) -> None:
    """Refuse an intermediate checkpoint of a fit that has not reached its target, saying whether the fit is still
    training it (it holds the directory's lock) or stopped. Checkpoints without the flag count as finished."""
    if cfg.get("finished", True):
        return
    done = f"{cfg.get('rows_trained', 0):,} of {cfg.get('max_rows') or 'one epoch of'} rows"
    try:
        with StoreLock(path):
            state = f"its fit stopped after {done}: re-run that fit to finish it"
    except LockedError:
        state = f"a fit is training it now ({done} so far): wait for it to finish"
    raise StoreError(f"SAE {path} is an unfinished checkpoint; {state} (or pass --allow-unfinished to use it as it is)")


def resolve_sae(path: str | Path) -> Path:
    """The local directory of an SAE given as a path or a Hugging Face Hub id (`owner/name`, or
    `hf://owner/name[/subfolder][@revision]`), downloaded into the hub cache if needed (mlsae_train.interop.hub)."""
    from mlsae_train.interop.hub import local_sae_dir

    return local_sae_dir(path)


def load_sae(
    path: str | Path, device: str | torch.device = "cpu", allow_unfinished: bool = False
) -> tuple[TopKSAE, dict[str, Any]]:
    """Load a checkpoint directory written by `save_sae`, or one on the Hugging Face Hub (`resolve_sae`): (the SAE on
    `device`, the cfg.json dict). An unfinished checkpoint (a fit still training, or stopped before its target) is
    refused unless `allow_unfinished`."""
    path = resolve_sae(path)
    cfg = _read_cfg(path)
    if not allow_unfinished:
        check_finished(path, cfg)
    return _sae_from(path, cfg).to(device), cfg


def _sae_from(path: Path, cfg: dict[str, Any], check: bool = True) -> TopKSAE:
    """The SAE of checkpoint directory `path` whose cfg.json is `cfg`: its tensors read and their shapes checked,
    then (unless the caller has, `check` False) cfg.json's seal and the weights file's crc32c."""
    sae_cfg = _sae_config(cfg, path / CFG_NAME)
    tensors = _read_tensors(path, cfg.get("save_id"), expected_shapes(sae_cfg))
    if check:
        check_checksums(path, cfg)
    sae = TopKSAE(sae_cfg)
    sae.load_state_dict(tensors)
    return sae


def check_checksums(path: Path, cfg: dict[str, Any]) -> list[str]:
    """Check the seal of cfg.json (`cfg`, read from checkpoint directory `path`) and the crc32c it records of
    sae.safetensors; CorruptError naming the file that does not match. Returns notes on what carries no checksum."""
    return check_weights_record(
        cfg,
        path / CFG_NAME,
        path / WEIGHTS_NAME,
        WEIGHTS_CRC,
        SEALED_KEYS,
        RESAVE,
        "an older or hand-written checkpoint",
    )


def verify_sae(path: Path) -> Verified:
    """Check the checkpoint directory `path` whole: cfg.json's seal and the crc32c of sae.safetensors first (so any
    damage is a CorruptError naming the file), then a full load, the trainer state where there is one
    (state.load_state checks its crc32c), and the lens it carries (lens.verify_lens)."""
    from mlsae_train.lens import SAE_LENS_DIR, has_lens, lens_of, verify_lens

    cfg = _read_cfg(path)
    notes = check_checksums(path, cfg)
    try:
        _sae_from(path, cfg, check=False)  # the checksums were just checked: the weights file is read once more
    except StoreError as e:  # damage in a checkpoint without checksums, found by reading it
        raise CorruptError(str(e)) from e
    checked = 2
    if state_exists(path):  # the trainer state a resume reads, its own checksum checked
        try:
            load_state(path)
        except StoreError as e:
            raise CorruptError(str(e)) from e
        checked += 1
    if has_lens(cfg):
        lens = verify_lens(path / SAE_LENS_DIR)
        lens_of(path, cfg)  # the copy is the lens cfg.json names
        checked, notes = checked + lens.checked, [*notes, *lens.notes]
    return Verified("SAE checkpoint", checked, "files", tuple(notes))


REFERENCE_CONFIG = "config.json"
REFERENCE_WEIGHTS = "model.safetensors"


def _read_reference_config(src: Path) -> tuple[SaeConfig, dict[str, Any]]:
    """SaeConfig from a reference config.json (n_inputs, n_latents, k, standardize defaulting to True)."""
    if not src.is_dir():
        raise NotFoundError(f"reference checkpoint directory {src} does not exist (download it first)")
    cfg_path = src / REFERENCE_CONFIG
    try:
        ref = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise StoreError(f"{src} has no {REFERENCE_CONFIG} (pass a bare reference checkpoint directory)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{cfg_path} is not valid JSON: {e} (download it again)") from e
    missing = [key for key in ("n_inputs", "n_latents", "k") if not isinstance(ref, dict) or key not in ref]
    if missing:
        raise StoreError(f"{cfg_path} lacks {', '.join(missing)} (is this a tim-lawson/mlsae checkpoint?)")
    if ref.get("lens") or ref.get("tuned_lens") or src.name.endswith("-lens"):
        raise StoreError(
            f"{src} is a reference checkpoint trained on lens-transformed residuals ('tuned_lens' in its config, or a "
            "-lens name) whose translators it does not hold: the authors' code applies the tuned-lens library's lens "
            "one block early (convert a checkpoint without -lens, or fit one with `mlsae-train lens` and `fit --lens`)"
        )
    if "standardize" not in ref:
        log.warning("%s has no 'standardize'; using the reference default True", cfg_path)
    sae_cfg = _sae_config({**ref, "d_model": ref["n_inputs"], "standardize": ref.get("standardize", True)}, cfg_path)
    return sae_cfg, ref


def _read_reference_tensors(src: Path, cfg: SaeConfig) -> dict[str, torch.Tensor]:
    """Our tensors from a reference model.safetensors: W_dec = decoder.weight^T, b_dec = pre_encoder_bias."""
    path = src / REFERENCE_WEIGHTS
    d, n = cfg.d_model, cfg.n_latents
    want = {"encoder.weight": (n, d), "decoder.weight": (d, n), "pre_encoder_bias": (d,)}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            ref = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iter
    except Exception as e:  # missing, truncated or foreign file
        raise StoreError(f"cannot read {path}: {e} (pass a bare reference checkpoint directory)") from e
    lens = sorted(name for name in ref if "lens" in name)
    if lens:
        raise StoreError(
            f"{path} holds lens translators ({', '.join(lens[:2])}, ...) of an unknown layout (convert a checkpoint "
            "without -lens, or a tuned-lens library lens with `mlsae-train import-lens`)"
        )
    for name, shape in want.items():
        if name not in ref or tuple(ref[name].shape) != shape:
            got = tuple(ref[name].shape) if name in ref else "missing"
            raise StoreError(f"{path}: {name} is {got}, {REFERENCE_CONFIG} implies {shape} (download it again)")
    return {
        "encoder.weight": ref["encoder.weight"].float(),
        "encoder.bias": torch.zeros(n),
        "W_dec": ref["decoder.weight"].float().T.contiguous(),
        "b_dec": ref["pre_encoder_bias"].float(),
    }


def convert_reference(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a published reference checkpoint (docs/METHOD.md section 8) into our format at out_dir.

    W_dec = decoder.weight^T (its columns are latent directions), b_dec = pre_encoder_bias, b_enc = 0;
    standardisation semantics are identical. cfg.json records the source directory and its config.
    """
    src = Path(src_dir)
    sae_cfg, ref_cfg = _read_reference_config(src)
    sae = TopKSAE(sae_cfg)
    sae.load_state_dict(_read_reference_tensors(src, sae_cfg))
    return save_sae(sae, out_dir, {"converted_from": str(src), "reference_config": ref_cfg})
