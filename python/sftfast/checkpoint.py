"""Checkpoints in nanochat's layout, written atomically and read without executing pickle code.

    {base_dir}/{base,mid,chatsft}_checkpoints/{model_tag}/
        model_{step:06d}.pt          model state_dict (rank 0)
        optim_{step:06d}_rank{r}.pt  per-rank trainer state: optimizer states, RNG, loader state
        meta_{step:06d}.json         model_config (nanochat's fields; softcap and rope_base in
                                     sftfast_model_config), step, hyperparameters, metrics (rank 0)

    from sftfast.checkpoint import save_checkpoint, load_checkpoint, load_model
    model, meta = load_model("runs/demo", "base", device="cpu")

Every file is written to a temporary name in the same directory, fsync'd, then renamed over
the final name, so a crash never leaves a half-written file under a real name. The meta file is
written last (after every rank's files, in DDP): a step counts as a checkpoint only when its
meta exists, so `find_last_step` never picks a step whose model or optimizer files are incomplete.
Loading uses `torch.load(weights_only=True)`: a checkpoint from an untrusted source cannot run
code (tensors, dicts, lists, numbers and strings only).

The meta also records each file's size and SHA-256 ("files"), and loading checks them: torch's
zip reader does not verify its CRCs, so a flipped bit in a tensor (a bad disk, a truncated or
half-copied file) loaded as silently different weights. nanochat's checkpoints have no "files"
entry and load unchecked. Hashing costs ~0.7 s per GB (SHA-256 at ~1.5 GB/s on a dev VM core).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile

import torch

SOURCES = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "chatsft": "chatsft_checkpoints"}


def default_base_dir() -> str:
    """Where checkpoints live when --base-dir is not given (every CLI): $SFTFAST_BASE_DIR, else
    nanochat's ~/.cache/nanochat."""
    return os.environ.get("SFTFAST_BASE_DIR", os.path.expanduser("~/.cache/nanochat"))


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


def checkpoints_dir(base_dir: str, source: str) -> str:
    if source not in SOURCES:
        raise CheckpointError(f"unknown checkpoint source {source!r}; choose from {sorted(SOURCES)}")
    return os.path.join(base_dir, SOURCES[source])


def file_digest(path: str) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file, as recorded in a meta's "files"."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _atomic_write(path: str, write) -> dict:
    """write(file_object) into a temp file next to `path`, fsync, rename over `path`; -> its digest."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        digest = file_digest(tmp)  # what reached the file, read back
        os.replace(tmp, path)
        return digest
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str) -> dict:
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json_save(obj, path: str) -> dict:
    return _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode("utf-8")))


def model_path(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"model_{step:06d}.pt")


def meta_path(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"meta_{step:06d}.json")


def optim_path(ckpt_dir, step, rank):
    return os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank:d}.pt")


def save_checkpoint(ckpt_dir: str, step: int, model_state: dict | None, trainer_state: dict | None, meta: dict | None,
                    rank: int = 0, gather=None) -> None:
    """Rank 0 writes the model; every rank writes its trainer state; then rank 0 writes the meta
    file that marks the checkpoint complete, with every file's size and SHA-256 under "files".

    gather(obj) -> [obj of rank 0, obj of rank 1, ...] collects each rank's file digests (in DDP
    dist.all_gather_object; it is also the barrier that keeps the meta last); None: one process.
    """
    files = {}
    if rank == 0 and model_state is not None:
        files[os.path.basename(model_path(ckpt_dir, step))] = atomic_torch_save(model_state, model_path(ckpt_dir, step))
    if trainer_state is not None:
        path = optim_path(ckpt_dir, step, rank)
        files[os.path.basename(path)] = atomic_torch_save(trainer_state, path)
    every_rank = gather(files) if gather is not None else [files]
    if rank == 0 and meta is not None:
        meta = dict(meta, files={name: digest for ranks_files in every_rank for name, digest in ranks_files.items()})
        atomic_json_save(meta, meta_path(ckpt_dir, step))


def verify_file(path: str, meta: dict, where: str) -> None:
    """Refuses a file whose size or SHA-256 differs from what the meta (file `where`) recorded.
    Files the meta does not list (nanochat's checkpoints list none) are not checked."""
    want = meta.get("files", {}).get(os.path.basename(path)) if isinstance(meta.get("files"), dict) else None
    if want is None or not os.path.exists(path):
        return
    if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) or not isinstance(want.get("sha256"), str):
        raise CheckpointError(f"{where}: the meta's record of {os.path.basename(path)} is damaged: {want!r}")
    size = os.path.getsize(path)
    if size != want["bytes"]:
        raise CheckpointError(f"{path} has {size} bytes, {want['bytes']} when it was saved ({where}): the file is "
                              f"truncated or was replaced")
    got = file_digest(path)["sha256"]
    if got != want["sha256"]:
        raise CheckpointError(f"{path} is damaged: its SHA-256 is {got}, {want['sha256']} when it was saved "
                              f"({where}); its tensors would load as different numbers")


def _load(path: str, device):
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a corrupt or pickle-laden file: say which and why
        raise CheckpointError(f"cannot load {path} with weights_only=True: {e}") from e


def read_meta(ckpt_dir: str, step: int) -> dict:
    """The meta file of a complete checkpoint (CheckpointError when it is missing or broken)."""
    mpath = meta_path(ckpt_dir, step)
    if not os.path.exists(mpath):
        raise CheckpointError(f"checkpoint step {step} in {ckpt_dir} is incomplete or missing: no {os.path.basename(mpath)}")
    with open(mpath, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{mpath}: invalid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{mpath}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load_checkpoint(ckpt_dir: str, step: int, device="cpu", load_trainer_state: bool = False, rank: int = 0):
    """-> (model_state, trainer_state or None, meta)."""
    meta = read_meta(ckpt_dir, step)
    verify_file(model_path(ckpt_dir, step), meta, meta_path(ckpt_dir, step))
    model_state = _load(model_path(ckpt_dir, step), device)
    if not isinstance(model_state, dict) or not all(isinstance(v, torch.Tensor) for v in model_state.values()):
        raise CheckpointError(f"{model_path(ckpt_dir, step)}: expected a state dict of tensors, got {type(model_state).__name__}")
    # torch.compile prefixes keys with _orig_mod.; DDP with module.
    model_state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in model_state.items()}
    trainer_state = None
    if load_trainer_state:
        verify_file(optim_path(ckpt_dir, step, rank), meta, meta_path(ckpt_dir, step))
        trainer_state = _load(optim_path(ckpt_dir, step, rank), device)
    return model_state, trainer_state, meta


def complete_steps(ckpt_dir: str) -> list[int]:
    """Steps with a meta file (= complete checkpoints) in `ckpt_dir`, ascending; [] if none."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(ckpt_dir) if (m := re.fullmatch(r"meta_(\d+)\.json", name)))


def saved_world_size(ckpt_dir: str, step: int) -> int:
    """How many ranks saved `step`, known before any rank reads its own trainer-state file: the
    meta's world_size; for checkpoints from before it was recorded, the number of
    optim_{step}_rank{r}.pt files."""
    world = read_meta(ckpt_dir, step).get("world_size")
    if world is not None:
        return int(world)
    pattern = re.compile(rf"optim_{step:06d}_rank(\d+)\.pt")
    return sum(1 for name in os.listdir(ckpt_dir) if pattern.fullmatch(name))


def checkpoint_files(ckpt_dir: str) -> list[str]:
    """Every checkpoint file (model_, optim_, meta_) in `ckpt_dir`, complete steps or not."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(n for n in os.listdir(ckpt_dir) if re.fullmatch(r"(meta_\d+\.json|model_\d+\.pt|optim_\d+_rank\d+\.pt)", n))


def remove_checkpoints(ckpt_dir: str) -> None:
    """Deletes every checkpoint file in `ckpt_dir`. Meta files go first, so an interrupted
    removal leaves no step that looks complete."""
    for name in sorted(checkpoint_files(ckpt_dir), key=lambda n: not n.startswith("meta_")):
        os.unlink(os.path.join(ckpt_dir, name))


def find_last_step(ckpt_dir: str) -> int:
    """Highest step with a meta file (= a complete checkpoint)."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"no checkpoint directory {ckpt_dir}")
    steps = complete_steps(ckpt_dir)
    if not steps:
        raise CheckpointError(f"no complete checkpoint (meta_*.json) in {ckpt_dir}")
    return max(steps)


def find_model_tag(checkpoints_root: str) -> str:
    """nanochat's guess: the deepest d<N> tag, else the most recently modified directory."""
    if not os.path.isdir(checkpoints_root):
        raise CheckpointError(f"no checkpoints directory {checkpoints_root}")
    tags = [t for t in os.listdir(checkpoints_root) if os.path.isdir(os.path.join(checkpoints_root, t))]
    if not tags:
        raise CheckpointError(f"no model tags in {checkpoints_root}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_root, t)))


def resolve(base_dir: str, source: str, model_tag: str | None = None, step: int | None = None) -> tuple[str, str, int]:
    """-> (checkpoint dir, model tag, step), guessing the tag and the last step when not given."""
    root = checkpoints_dir(base_dir, source)
    tag = model_tag or find_model_tag(root)
    ckpt_dir = os.path.join(root, tag)
    return ckpt_dir, tag, find_last_step(ckpt_dir) if step is None else step


# nanochat builds its model with GPTConfig(**meta["model_config"]) and its config has exactly
# these fields; sftfast's other fields (softcap, rope_base) go under "sftfast_model_config" so
# that nanochat's tools (chat_web, chat_eval) can load an sftfast checkpoint.
NANOCHAT_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


def model_config_meta(config) -> dict:
    """The meta entries describing a model: {"model_config": nanochat's fields, "sftfast_model_config": the rest}."""
    full = config.to_dict()
    return dict(model_config={k: full[k] for k in NANOCHAT_CONFIG_KEYS},
                sftfast_model_config={k: v for k, v in full.items() if k not in NANOCHAT_CONFIG_KEYS})


# Later nanochat GPTs (sliding-window attention, value embeddings, per-layer residual scalars)
# compute another function: loading one with those parts dropped would train a different model.
LATER_ARCHITECTURE = ("sftfast's GPT is nanochat's of late 2025 (rotary, QK norm, ReLU^2 MLP, GQA, logit softcap); "
                      "checkpoints of a later nanochat architecture are not supported")


def build_model(model_state: dict, meta: dict, device="cpu", where: str = "checkpoint"):
    """GPT from a loaded state dict and its meta (model_config, plus sftfast_model_config when present).

    The config is checked against the state dict's shapes on the meta device before anything
    is allocated: an edited meta (n_layer 2**40, a huge vocabulary) fails at once, clearly,
    instead of building for hours or allocating terabytes. `where` names the checkpoint."""
    from sftfast.model import GPT, GPTConfig

    if not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{where}: meta has no model_config object")
    fields = {**meta["model_config"], **(meta.get("sftfast_model_config") or {})}
    bad = [f"{k}={fields[k]!r}" for k in NANOCHAT_CONFIG_KEYS
           if k in fields and (isinstance(fields[k], bool) or not isinstance(fields[k], int) or fields[k] < 1)]
    if bad:
        raise CheckpointError(f"{where}: model_config needs positive integers, got {', '.join(bad)}")
    layers = {k.split(".")[2] for k in model_state if k.startswith("transformer.h.")}
    n_layer = fields.get("n_layer", GPTConfig.n_layer)
    if n_layer != len(layers):
        raise CheckpointError(f"{where}: model_config n_layer={n_layer} but the weights hold {len(layers)} layers")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:
        raise CheckpointError(f"{where}: model_config has fields sftfast's GPT does not know ({', '.join(unknown)}); "
                              + LATER_ARCHITECTURE)
    try:
        config = GPTConfig(**fields)
        config.validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: meta model_config does not fit GPTConfig: {e}") from e
    with torch.device("meta"):
        model = GPT(config)
    want = model.state_dict()
    extra = [k for k in model_state if k not in want]
    if extra:
        raise CheckpointError(f"{where}: the weights hold parameters sftfast's GPT does not have ({', '.join(extra[:4])}"
                              f"{f' and {len(extra) - 4} more' if len(extra) > 4 else ''}); " + LATER_ARCHITECTURE)
    wrong = [f"{k} {tuple(v.shape)} (model_config: {tuple(want[k].shape)})"
             for k, v in model_state.items() if k in want and v.shape != want[k].shape]
    if wrong:
        raise CheckpointError(f"{where}: the weights do not match model_config: {'; '.join(wrong[:3])}")
    model.to_empty(device=device)
    model.init_weights()  # fills the (non-persistent) rotary buffers
    # bf16 weights from a GPU run train in fp32 here (autocast handles low precision on GPU)
    model_state = {k: v.float() if v.is_floating_point() else v for k, v in model_state.items()}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: checkpoint does not match its model_config: {e}") from e
    return model


def load_model(base_dir: str, source: str, model_tag: str | None = None, step: int | None = None, device="cpu"):
    """-> (model, meta) of a checkpoint in nanochat's layout."""
    ckpt_dir, tag, step = resolve(base_dir, source, model_tag, step)
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device)
    model = build_model(model_state, meta, device, where=f"{ckpt_dir} step {step}")
    meta = dict(meta, model_tag=tag, step=step, checkpoint_dir=ckpt_dir)
    return model, meta
