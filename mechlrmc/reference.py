"""Import the reference implementation's checkpoint files as a run directory (docs/FINDINGS.md, S2).

A file is `torch.save({"epoch", "model", "optim", "train_loss", "eval_loss", "vocab_size"})`,
written when `(epoch + 1) % save_freq == 0` after the optimizer step, so it holds the weights after
`epoch + 1` steps (`7x7_p03_r2_l4_h8_grok3999.tar` is step 4000). `model` has HF `BertModel` keys
under `_backbone.` (no token-type weights; 512 position rows) plus `read_out.weight/bias`;
`optim` is `torch.optim.Adam.state_dict()`.

Files are read with `torch.load(weights_only=True)` only: a file that needs arbitrary code to
unpickle is refused before any of its code runs. Every file is checked against the config before
anything is written. The run keeps the files' full position table (`model.n_ctx` = its rows). The
last file's Adam moments are mapped with the same reshapes as the weights, so `mechlrmc train
--resume` continues from it (with a fresh data stream: the reference sets no seed).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mechlrmc import resume
from mechlrmc.config import ConfigError, RunConfig
from mechlrmc.convert import from_reference_state_dict, reference_shapes, reference_tensors, strip_prefix
from mechlrmc.runs import CheckpointError, Run, RunLock
from mechlrmc.train import DATA_SEED_OFFSET

KEYS = ("epoch", "model", "optim", "train_loss", "eval_loss", "vocab_size")
BUFFERS = ("position_ids", "token_type_ids")  # non-parameter entries older HF versions saved


def load_reference_file(path: str | Path) -> dict:
    """The dict stored in a reference file, loaded without running any code from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file: allowed a reference checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} needs arbitrary code to unpickle and was refused (nothing in it ran): "
                              f"allowed tensors, numbers, strings, lists and dicts only [{reason}]") from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"{path} is not a readable torch.save file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(obj, dict) or not {"epoch", "model"} <= set(obj):
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is not a reference checkpoint: it holds {found}; expected keys {list(KEYS)}")
    if not isinstance(obj["epoch"], int) or obj["epoch"] < 0:
        raise CheckpointError(f"{path} has epoch={obj['epoch']!r}: allowed an integer >= 0")
    if not isinstance(obj["model"], dict) or not all(isinstance(v, torch.Tensor) for v in obj["model"].values()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    return obj


def check_file(path: Path, obj: dict, cfg: RunConfig) -> int:
    """The step the file holds (epoch + 1), after checking its tensors against `cfg`."""
    try:
        shapes = reference_shapes(obj["model"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    expected = {
        "model.d_model": (cfg.model.d_model, shapes["d_model"]),
        "model.n_layers": (cfg.model.n_layers, shapes["n_layers"]),
        "model.d_mlp": (cfg.model.d_mlp, shapes["d_mlp"]),
        "vocabulary (MASK + 2 * data.value_max / data.precision + 1)": (cfg.data.vocab_size, shapes["d_vocab"]),
    }
    if "vocab_size" in obj and isinstance(obj["vocab_size"], int):
        expected["the file's vocab_size"] = (cfg.data.vocab_size, obj["vocab_size"])
    if cfg.model.n_ctx:
        expected["model.n_ctx (position rows)"] = (cfg.model.n_ctx, shapes["n_ctx"])
    wrong = [f"{name} is {ours} in the config, {theirs} in the file" for name, (ours, theirs) in expected.items()
             if ours != theirs]
    if shapes["n_ctx"] < cfg.data.seq_len:
        wrong.append(f"positions: the config's matrices need data.m * data.n = {cfg.data.seq_len}, "
                     f"the file has {shapes['n_ctx']}")
    query = {strip_prefix(k): v for k, v in obj["model"].items()}.get("encoder.layer.0.attention.self.query.weight")
    if query is None:
        raise CheckpointError(f"{path}: the model has no encoder.layer.0.attention.self.query.weight: "
                              f"allowed HF BertModel keys plus read_out")
    if query.shape[0] % cfg.model.n_heads:
        wrong.append(f"model.n_heads is {cfg.model.n_heads} in the config, which does not divide the file's "
                     f"query width {query.shape[0]}")
    if wrong:
        raise ConfigError(f"{path} does not fit the config: " + "; ".join(wrong))
    return obj["epoch"] + 1


def _scalar(value) -> float | None:
    """A loss as stored: a number, a 0-d tensor, or a history whose last entry is current."""
    if isinstance(value, torch.Tensor):
        return float(value.flatten()[-1]) if value.numel() else None
    if isinstance(value, (list, tuple)):
        return _scalar(value[-1]) if value else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def map_adam_state(model: dict[str, torch.Tensor], optim: dict, n_heads: int) -> dict[str, dict[str, torch.Tensor]] | None:
    """The reference Adam state by our parameter names (`{name: {step, exp_avg, exp_avg_sq}}`, as
    `mechlrmc.resume.pack` takes it), or None where it cannot be mapped. Adam numbers parameters in `model.parameters()` order, which is
    the state dict's order without buffers; the pooler (never stepped) and token-type rows drop out."""
    if not isinstance(optim, dict) or "state" not in optim or "param_groups" not in optim:
        return None
    names = [k for k in model if not k.endswith(BUFFERS)]
    indices = [i for group in optim["param_groups"] for i in group.get("params", [])]
    if len(indices) != len(names):
        return None
    moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    steps = set()
    for index, name in zip(indices, names):
        state = optim["state"].get(index)
        if not state:
            continue
        for key in moments:
            if key not in state or state[key].shape != model[name].shape:
                return None
            moments[key][name] = state[key]
        steps.add(float(state["step"]))
    if len(steps) != 1:
        return None
    step = torch.tensor(steps.pop())  # float32, as torch's Adam keeps it
    out: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for key, tensors in moments.items():
            for name, value in reference_tensors(tensors, n_heads, fold_token_type=False).items():
                out.setdefault(name, {"step": step.clone()})[key] = value.float()
    except (KeyError, ConfigError):  # a parameter that has weights but no Adam state
        return None
    return out


def import_reference(files: list[str | Path], out: str | Path, cfg: RunConfig) -> tuple[Run, bool]:
    """Write `files` into a new run directory `out`; True if it can be resumed with their Adam state."""
    if not files:
        raise ConfigError("no files to import: allowed one or more reference checkpoint files")
    checked, n_ctx = {}, set()
    for path in map(Path, files):
        obj = load_reference_file(path)
        step = check_file(path, obj, cfg)
        if step in checked:
            raise CheckpointError(f"{path} and {checked[step][0]} both hold step {step}: allowed one file per step")
        checked[step] = (path, _scalar(obj.get("train_loss")), _scalar(obj.get("eval_loss")))
        n_ctx.add(reference_shapes(obj["model"])["n_ctx"])
        del obj
    if len(n_ctx) > 1:
        raise CheckpointError(f"the files have position tables of different sizes {sorted(n_ctx)}: allowed one size")
    last = max(checked)
    cfg = cfg.override({"model.n_ctx": n_ctx.pop(), "train.steps": max(cfg.train.steps, last)})
    Run.check_new(out)
    with RunLock(out):
        run = Run.create(out, cfg)
        run.save_provenance({"source": "reference implementation checkpoints",
                             "files": [str(checked[s][0]) for s in sorted(checked)]})
        for step in sorted(checked):
            path, train_loss, eval_loss = checked[step]
            obj = load_reference_file(path)
            model = from_reference_state_dict(obj["model"], cfg)
            run.save_checkpoint(step, model.state_dict())
            run.append_metrics([{"step": step, "loss": train_loss, "eval_loss": eval_loss}])
            if step == last:
                adam = map_adam_state(obj["model"], obj.get("optim"), cfg.model.n_heads)
                if adam is not None:
                    generator = torch.Generator().manual_seed(cfg.train.seed + DATA_SEED_OFFSET)
                    run.save_resume_state(step, resume.pack(model.state_dict(), adam, generator.get_state()),
                                          resume.meta(0.0))
    return run, adam is not None
