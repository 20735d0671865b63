"""Runs that already exist become run directories (`mechlrmc import SRC DEST`); `import_run` tells
which of two kinds SRC is:

- a `transformers.Trainer` output folder: the weights of its `checkpoint-N/` folders
  (`model.safetensors` or `pytorch_model.bin`), and those in SRC itself at its trainer_state.json's
  `global_step` (unless it names a best model, which the Trainer may have loaded at the end). The
  factory is the Trainer callback's (`mechlrmc.integrations.hf:from_config`, the model's config);
  the metrics are the newest trainer_state.json's `log_history`, as the callback files them.
- Lightning checkpoints (`*.ckpt` at any depth): a file's `global_step` is its step, its
  `state_dict` less the LightningModule's attribute prefix (default: the first name component every
  key shares, `model.`) the weights of the user's factory's model; a step in several files
  (`last.ckpt`, a rerun's `-v1`) is taken from the newest. Losses come from the metrics.csv of
  Lightning's CSVLogger under SRC, whose row k belongs to the update that makes step k + 1 (the
  validation after the second update is step 2's).

DEST is written as the Recorder writes a recorded run (`mechlrmc.record`), with provenance.json
saying where it came from. With a `task`, each checkpoint is evaluated on the task's batch, and the
loop's own evaluation losses become `trainer_eval_*` (Trainer) or `loop_eval_*` (Lightning). DEST is
written as a temporary sibling (`.DEST.tmpPID`) renamed at the end: complete or absent. Files are
read with safetensors or `torch.load(weights_only=True)` only; nothing in SRC is written.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch

from mechlrmc.config import RecordConfig, RunConfig, TrainConfig
from mechlrmc.errors import UsageError
from mechlrmc.factory import build_model, check_fits
from mechlrmc.files import TMP_MARK, write_failed
from mechlrmc.progress import progress_bar
from mechlrmc.record import EVAL_BATCH
from mechlrmc.record_config import describe_model
from mechlrmc.runs import Run, RunLock
from mechlrmc.sites import SiteError, Sites
from mechlrmc.tasks import get_task

HF_FACTORY = "mechlrmc.integrations.hf:from_config"
ALLOWED_SRC = ("allowed a transformers.Trainer output folder (checkpoint-N/ folders) or a folder of Lightning "
               "checkpoints (*.ckpt)")
# metrics.csv columns of Lightning's CSVLogger -> ours; later entries win where a row has both
LIGHTNING_COLUMNS = {"loss": "loss", "train_loss": "loss", "eval_loss": "eval_loss", "val_loss": "eval_loss"}
STATE_KEYS = ("train_batch_size", "max_steps", "num_train_epochs", "logging_steps", "eval_steps", "save_steps")


class RunImportError(UsageError, ValueError):
    """A SRC that cannot be imported: not a folder, no checkpoints, unreadable or unsafe files."""


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _paths(src: str | Path, dest: str | Path) -> tuple[Path, Path]:
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise RunImportError(f"SRC={str(src)!r} is not a folder: {ALLOWED_SRC}")
    if dest.resolve().is_relative_to(src.resolve()):
        raise RunImportError(f"DEST={str(dest)!r} is inside SRC={str(src)!r}: allowed a DEST outside it")
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise RunImportError(f"DEST={str(dest)!r} exists: allowed a new or empty directory (an import never writes "
                             f"into an existing run)")
    return src, dest


def _torch_load(file: Path) -> Any:
    """A torch.save file's contents, unpickled with `weights_only=True`: nothing in it runs."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        raise RunImportError(f"{file} needs arbitrary code to unpickle and was refused (nothing in it ran): allowed "
                             f"tensors, numbers, strings, lists and dicts only" + (f" [{reason}]" if reason else "")
                             ) from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise RunImportError(f"{file} is not a readable torch.save file ({_first_line(e)})") from None


def _scalars(values: dict) -> dict[str, Any]:
    """The JSON scalars (and lists of numbers) of `values`: what the loop told, as `record.loop` keeps it."""
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()
            if isinstance(v, (bool, int, float, str)) or isinstance(v, (list, tuple)) and v
            and all(isinstance(x, (int, float)) for x in v)}


def _train(steps: int, eval_every: int) -> TrainConfig:
    """The `train` section of an imported run: its length and how often it was evaluated."""
    return TrainConfig(steps=max(steps, 1), eval_every=max(eval_every, 1), log_every=1, eval_batch_size=EVAL_BATCH,
                       device="cpu", threads=torch.get_num_threads())


def _setup(model: torch.nn.Module, factory: str, kwargs: dict, task: str | None, sites: dict | None, source: str,
           loop: dict) -> tuple[RunConfig, Sites, Any]:
    """The run's config, its sites (checked) and the task's evaluation batch (None for the `loop`
    task, which has no data), after one forward of the task's tokens through the model."""
    kind = get_task(task or "loop")
    data, sites = kind.config(), Sites.from_dict(sites) if sites else Sites.of(model)
    sites.check(model)
    cfg = RunConfig(data=data, model=None, train=_train(1, 1), record=RecordConfig(
        model_factory=factory, factory_kwargs=kwargs, sites=sites.to_dict(), checkpoints=[], source=source,
        workdir=str(Path.cwd()), loop=loop, model=describe_model(model, sites)))
    if not kind.has_data:
        return cfg, sites, None
    eval_data = kind.eval_batch(cfg)
    tokens = eval_data[:2].tokens
    try:
        with torch.no_grad():
            _, acts = sites.capture(model.eval(), tokens)
    except SiteError:
        raise
    except (IndexError, RuntimeError, ValueError) as e:
        raise RunImportError(f"--task {data.task} does not fit the model: on its tokens {list(tokens.shape)} (ids "
                             f"0..{data.vocab_size - 1}) it fails ({type(e).__name__}: {_first_line(e)}); allowed a "
                             f"task whose sequences and vocabulary the model reads") from None
    cfg.record.model = describe_model(model, sites, {k: tuple(v.shape) for k, v in acts.items()})
    return cfg, sites, eval_data


def _write(src: Path, dest: Path, cfg: RunConfig, model: torch.nn.Module, sites: Sites, eval_data: Any,
           checkpoints: Iterator[tuple[int, dict[str, torch.Tensor], Path]], total: int,
           rows: dict[int, dict[str, float]], progress: bool) -> Run:
    """Write the run into a temporary sibling of `dest`, renamed to `dest` once complete.
    `checkpoints` yields (step, state dict, file) in any order; a repeated step is skipped."""
    tmp = dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}"
    files: dict[int, str] = {}
    try:
        with RunLock(tmp):
            run = Run.create(tmp, cfg)
            for step, state, file in progress_bar(iterable=checkpoints, total=total, desc="import", unit="checkpoint",
                                                  disable=not progress):
                if step in files:
                    continue
                run.save_checkpoint(step, state)
                files[step] = str(file.relative_to(src))
                if eval_data is not None:  # the task's evaluation of these weights, as the recorder's
                    model.load_state_dict(state)
                    with torch.no_grad():
                        evaluation = cfg.task.evaluate(model.eval(), eval_data, sites)
                    rows.setdefault(step, {}).update({f"eval_{k}": v for k, v in evaluation.items()})
            run.append_metrics([{"step": step, **rows[step]} for step in sorted(rows)])
            evaluated = sorted(s for s, row in rows.items() if "eval_loss" in row)
            every = min((b - a for a, b in zip(evaluated, evaluated[1:])), default=1)
            run.save_config(replace(cfg, train=_train(max([*files, *rows]), every),
                                    record=replace(cfg.record, checkpoints=sorted(files))))
            run.save_provenance({"source": f"imported by mechlrmc from a {cfg.record.source} run",
                                 "imported_from": str(src.resolve()), "files": [files[s] for s in sorted(files)]})
        try:
            os.rename(tmp, dest)
        except OSError as e:
            raise write_failed(dest, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Run(dest)


# ----- a transformers.Trainer output folder -----
def _trainer_state(folder: Path) -> dict:
    file = folder / "trainer_state.json"
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError) as e:
        raise RunImportError(f"{file} is not readable JSON ({_first_line(e)})") from None


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights a Trainer saved in `folder`: model.safetensors, else pytorch_model.bin."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        try:
            return load_file(folder / "model.safetensors")
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise RunImportError(f"{folder / 'model.safetensors'} is unreadable ({_first_line(e)})") from None
    state = _torch_load(folder / "pytorch_model.bin") if (folder / "pytorch_model.bin").is_file() else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunImportError(f"{folder} has no weights: allowed model.safetensors or pytorch_model.bin (a state dict)")
    return state


def _hf_state(model: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """The model's whole state dict with `folder`'s weights loaded: a name the file leaves out must be
    one the model ties to a name it has (an LM head tied to the embedding)."""
    tensors, own = _hf_weights(folder), model.state_dict()
    given = {own[k].data_ptr() for k in tensors if k in own}
    tied = {k: v for k, v in own.items() if k not in tensors and v.data_ptr() in given}
    check_fits(model, {**tensors, **tied}, f"the weights in {folder}")
    model.load_state_dict(tensors, strict=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hf_kwargs(folder: Path) -> dict:
    """The factory kwargs the Trainer callback records: the model's config and its class."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder)).to_dict()
    except (OSError, ValueError, KeyError) as e:
        raise RunImportError(f"{folder / 'config.json'} is not a transformers config ({_first_line(e)}): allowed the "
                             f"config.json a Trainer saves, or --factory") from None
    for key in ("torch_dtype", "dtype", "_name_or_path"):  # as the callback's; not where it was read from
        config.pop(key, None)
    return {"config": config, "architecture": (config.get("architectures") or [None])[0]}


def import_trainer(src: str | Path, dest: str | Path, *, task: str | None = None, sites: dict | None = None,
                   factory: str | None = None, factory_kwargs: dict | None = None, progress: bool = True) -> Run:
    """A `transformers.Trainer` output folder `src` as the run directory `dest` (module docstring);
    `factory` defaults to the Trainer callback's, with the newest checkpoint's config."""
    src, dest = _paths(src, dest)
    try:
        from mechlrmc.integrations.hf import SPEED
    except ModuleNotFoundError as e:
        raise RunImportError(f"a transformers.Trainer folder needs the {e.name} package: pip install {e.name}") from None
    folders = {int(p.name[11:]): p for p in src.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()}
    root = _trainer_state(src)
    state = max([_trainer_state(folders[max(folders)]) if folders else {}, root], key=lambda s: s.get("global_step", 0))
    if (any((src / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
            and isinstance(root.get("global_step"), int) and not root.get("best_model_checkpoint")):
        folders.setdefault(root["global_step"], src)
    if not folders:
        raise RunImportError(f"SRC={str(src)!r} has no checkpoint-N/ folders: {ALLOWED_SRC}")
    if factory is None:
        factory, factory_kwargs = HF_FACTORY, _hf_kwargs(folders[max(folders)])
    factory_kwargs = dict(factory_kwargs or {})
    model = build_model(factory, factory_kwargs)
    version = factory_kwargs.get("config", {}).get("transformers_version") if factory == HF_FACTORY else None
    loop = _scalars({"framework": f"transformers {version}" if version else None,
                     **{k: state.get(k) for k in STATE_KEYS}})
    cfg, sites, eval_data = _setup(model, factory, factory_kwargs, task, sites, "transformers", loop)
    rows: dict[int, dict[str, float]] = {}
    for entry in state.get("log_history", []):
        if "train_runtime" in entry or not isinstance(entry.get("step"), int):
            continue  # the closing summary: figures of the whole run
        row = rows.setdefault(entry["step"], {})
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step" \
                    and not key.endswith(SPEED):
                row[f"trainer_{key}" if eval_data is not None and key.startswith("eval_") else key] = float(value)
    checkpoints = ((step, _hf_state(model, folders[step]), folders[step]) for step in sorted(folders))
    return _write(src, dest, cfg, model, sites, eval_data, checkpoints, len(folders), rows, progress)


# ----- a folder of Lightning checkpoints -----
def _ckpt(file: Path) -> dict:
    obj = _torch_load(file)
    if not (isinstance(obj, dict) and isinstance(obj.get("global_step"), int) and obj["global_step"] >= 0
            and isinstance(obj.get("state_dict"), dict)
            and all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values())):
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise RunImportError(f"{file} is not a Lightning checkpoint: it holds {found}; allowed a file with "
                             f"'global_step' (an integer >= 0) and 'state_dict' (tensors)")
    return obj


def _prefix(keys: list[str], prefix: str | None, file: Path) -> str:
    """The LightningModule's attribute prefix of the model's keys ("model."; "" keeps them as they are)."""
    firsts = sorted({k.split(".", 1)[0] for k in keys})
    if prefix is None:
        return f"{firsts[0]}." if len(firsts) == 1 and all("." in k for k in keys) else ""
    prefix = prefix if not prefix or prefix.endswith(".") else f"{prefix}."
    if not any(k.startswith(prefix) for k in keys):
        raise RunImportError(f"--prefix {prefix!r} begins none of the state_dict keys of {file}: allowed one of "
                             f"{[f'{p}.' for p in firsts][:8]}, or '' (the keys as they are)")
    return prefix


def _lightning_rows(src: Path, has_data: bool) -> dict[int, dict[str, float]]:
    """The losses in the metrics.csv files of Lightning's CSVLogger under `src` (a later version wins
    at a step), each under the step after the update its row belongs to (module docstring)."""
    def version(file: Path) -> int:
        number = file.parent.name.partition("_")[2]
        return int(number) if number.isdigit() else -1

    rows: dict[int, dict[str, float]] = {}
    for file in sorted(src.glob("**/version_*/metrics.csv"), key=version):
        with open(file, newline="") as f:
            for entry in csv.DictReader(f):
                for column, name in LIGHTNING_COLUMNS.items():
                    if entry.get(column) not in (None, "") and (entry.get("step") or "").isdigit():
                        name = f"loop_{name}" if has_data and name.startswith("eval_") else name
                        rows.setdefault(int(entry["step"]) + 1, {})[name] = float(entry[column])
    return rows


def import_lightning(src: str | Path, dest: str | Path, *, factory: str | None = None, factory_kwargs: dict | None = None,
                     prefix: str | None = None, task: str | None = None, sites: dict | None = None,
                     progress: bool = True) -> Run:
    """A folder of Lightning checkpoints `src` as the run directory `dest` (module docstring); the
    model is `factory(**factory_kwargs)`, the module the LightningModule holds under `prefix`."""
    src, dest = _paths(src, dest)
    files = sorted(src.rglob("*.ckpt"), key=lambda f: (-f.stat().st_mtime, str(f)))  # the newest first
    if not files:
        raise RunImportError(f"SRC={str(src)!r} has no Lightning checkpoints (*.ckpt): {ALLOWED_SRC}")
    if not factory:
        raise RunImportError("Lightning checkpoints need --factory: allowed 'module:callable' or 'path/to/file.py:"
                             "callable' building the model the LightningModule holds (with --factory-kwargs JSON)")
    first = _ckpt(files[0])
    prefix = _prefix(list(first["state_dict"]), prefix, files[0])
    factory_kwargs = dict(factory_kwargs or {})
    model = build_model(factory, factory_kwargs)

    def weights(file: Path, ckpt: dict) -> dict[str, torch.Tensor]:
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        check_fits(model, state, f"{file} (its state_dict less the prefix {prefix!r})")
        return state

    weights(files[0], first)  # a factory that does not fit fails before anything is written
    groups = [s["param_groups"][0] for s in first.get("optimizer_states") or [] if s.get("param_groups")]
    version = first.get("pytorch-lightning_version")
    loop = _scalars({"framework": f"lightning {version}" if version else None,
                     **{k: v for k, v in (groups[0] if groups else {}).items() if k != "params"}})
    cfg, sites, eval_data = _setup(model, factory, factory_kwargs, task, sites, "lightning", loop)
    checkpoints = ((c["global_step"], weights(f, c), f) for f, c in ((f, _ckpt(f)) for f in files))
    return _write(src, dest, cfg, model, sites, eval_data, checkpoints, len(files),
                  _lightning_rows(src, eval_data is not None), progress)


def import_run(src: str | Path, dest: str | Path, *, prefix: str | None = None, **options: Any) -> Run:
    """`src` as the run directory `dest`: a `transformers.Trainer` output folder (checkpoint-N/ folders or
    trainer_state.json) by `import_trainer`, else Lightning checkpoints by `import_lightning`; `options`:
    factory, factory_kwargs, task, sites, progress, as theirs."""
    if any(Path(src).glob("checkpoint-*/")) or (Path(src) / "trainer_state.json").is_file():
        if prefix is not None:
            raise RunImportError(f"--prefix is for Lightning checkpoints; {src} is a transformers.Trainer folder")
        return import_trainer(src, dest, **options)
    return import_lightning(src, dest, prefix=prefix, **options)
