"""A model's anatomy: where its parts are, derived once, and read or edited the same way on any model.

Every lens that looks inside a model (the head taxonomy, attention views, ablation, patching, probes)
goes through an `Anatomy`; every lens that changes parameters (swaps, freeze/retrain, the LLC per
component) goes through its component groups. Per layer `L` the parts are

    resid.L     the residual stream after block L            [batch, pos, d_model]
    attn_out.L  the attention's output, added to the stream  [batch, pos, d_model]
    mlp_out.L   the MLP's output, added to the stream        [batch, pos, d_model]
    pattern.L   the attention pattern                        [batch, head, query, key]
    z.L         the heads' outputs before the out projection [batch, pos, head, d_head]

plus `final`, the state the read-out sees, and the component groups of `mechlrmc.components`
(`attn.L`, `mlp.L`, `embeddings`, `ln_final`, `unembed`), each the model's own parameter names.
It is derived, not typed:

- mechlrmc's model and TransformerLens models: their hook points (`blocks.L.attn.hook_z`, ...);
- Hugging Face models: TransformerLens 4's `TransformerBridge` maps the architecture onto the same
  hook names. The bridge changes the module it wraps, so lenses read a bridged *copy* with eager
  attention (`Anatomy.subject`), never the user's live model; the component groups name the
  Hugging Face model's own parameters, which the parameter lenses change;
- a plain `nn.Module`: the module paths the user names (the recorder's `sites`), with `{L}` for the
  layer: `{"attention": "blocks.{L}.attn.pattern", "z": "blocks.{L}.attn.out", "resid": "blocks.{L}"}`.
  `z` names the out projection: its *input*, split into heads. A name may end in `:I`, element I of
  the module's tuple output (`"blocks.{L}.attn:1"` for an attention returning `(y, att)`).

Reading and editing use plain PyTorch forward hooks on those modules, so one implementation of each
lens serves every model:

    anatomy = Anatomy.of(model, sites)
    logits, acts = anatomy.run(model, tokens, read=["pattern.0", "z.1"])
    logits, _ = anatomy.run(model, tokens, edit={"z.1": lambda z: z * 0})
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from mechlrmc.errors import OptionError, UsageError

PARTS = ("resid", "attn_out", "mlp_out", "pattern", "z")


HOW_TO_NAME = {  # the recorder's `sites` key that names each part of a plain module, with an example
    "resid": "'resid': 'blocks.{L}' (each block's output)",
    "attn_out": "'attn_out': 'blocks.{L}.attn' (the attention module's output)",
    "mlp_out": "'mlp_out': 'blocks.{L}.mlp' (the MLP module's output)",
    "pattern": "'attention': 'blocks.{L}.attn.pattern' (a module whose output is the pattern; ':1' for an element "
               "of a tuple)",
    "z": "'z': 'blocks.{L}.attn.out' (the out projection: its input is the heads' outputs side by side)",
    "final": "'final': 'ln_f' (the state the read-out sees)",
    "embed": "'resid': 'blocks.{L}' (the embeddings are the first block's input)",
}


class AnatomyError(UsageError, ValueError):
    """A lens needs a part the model's anatomy lacks, or a part or head out of range."""


@dataclass(frozen=True)
class Place:
    """Where one part is read: a module's output (or input), optionally one element of a tuple,
    optionally split along its last axis into `heads`."""

    module: str
    side: str = "output"  # "output" | "input"
    index: int | None = None
    heads: int = 0

    @classmethod
    def parse(cls, text: str, side: str = "output", heads: int = 0) -> Place:
        module, _, index = text.partition(":")
        if index and not index.isdigit():
            raise AnatomyError(f"site {text!r} is invalid: allowed 'module.path' or 'module.path:I' (element I of "
                               f"a tuple output)")
        return cls(module, side, int(index) if index else None, heads)

    def value(self, raw: Any) -> torch.Tensor:
        """The part from a module's output (or its positional inputs, a tuple)."""
        value = raw[self.index or 0] if isinstance(raw, (tuple, list)) else raw
        return value.unflatten(-1, (self.heads, -1)) if self.heads else value

    def replace(self, raw: Any, value: torch.Tensor) -> Any:
        """`raw` with the part replaced by `value`."""
        value = value.flatten(-2) if self.heads else value
        if not isinstance(raw, (tuple, list)):
            return value
        items = list(raw)
        items[self.index or 0] = value
        return type(raw)(items) if isinstance(raw, tuple) else items


@dataclass(frozen=True)
class Anatomy:
    n_layers: int
    n_heads: int
    places: dict[str, tuple[Place, ...]]  # part -> one place per layer; a part it lacks is absent
    final: Place | None
    embed: Place | None  # the stream entering block 0 (the embeddings)
    groups: dict[str, tuple[str, ...]]  # component -> the model's own parameter names
    source: str  # "mechlrmc", "transformer_lens", "transformers", "named"
    model_name: str = ""
    bridged: bool = False  # lenses read `subject(model)`, a TransformerBridge copy
    pattern_kind: str = "softmax"  # "linear": rows need not sum to 1 (the plateau paper's attention)

    # ----- what it has -----
    def has(self, *parts: str) -> bool:
        """Whether it has every part named (a layered part, "embed", "final", or "components": parameter groups)."""
        return all(p in self.places or (p in ("final", "embed") and getattr(self, p) is not None)
                   or (p == "components" and bool(self.groups))
                   or (p == "tables" and all(len(self.groups.get(g, ())) == 1 for g in ("embed", "pos_embed")))
                   for p in parts)

    def table(self, model: torch.nn.Module, name: str) -> torch.nn.Parameter:
        """The token ("embed") or position ("pos_embed") table of `model`, [rows, d_model]: its one
        parameter in that group."""
        names = self.groups.get(name, ())
        if len(names) != 1:
            raise AnatomyError(f"the {name} table of {self.model_name} is not known: name it in the recorder's sites, "
                               f"e.g. 'components': {{'embed': 'tok', 'pos_embed': 'pos'}} (one parameter [rows, d_model])")
        return dict(model.named_parameters())[names[0]]

    def require(self, parts: Iterable[str], lens: str) -> None:
        """One line naming the first part `lens` needs that the anatomy lacks, and how to name it."""
        for part in parts:
            if not self.has(part):
                where = "" if part in ("final", "embed") else " of every layer"
                raise AnatomyError(f"{lens} needs {part}{where}, which the anatomy of {self.model_name} lacks: name "
                                   f"it in the recorder's sites, e.g. {HOW_TO_NAME.get(part, part)}")

    def missing(self) -> list[str]:
        return [p for p in ("embed", *PARTS, "final") if not self.has(p)]

    def describe(self) -> str:
        found = [p for p in ("embed", *PARTS, "final") if self.has(p)]
        how = {"mechlrmc": "its hook points", "transformer_lens": "its TransformerLens hook points",
               "transformers": "TransformerBridge", "named": "the named sites"}[self.source]
        text = (f"{self.model_name} through {how}: {self.n_layers} layer(s) x {self.n_heads} head(s); "
                f"parts {', '.join(found) or 'none'}")
        return text + (f"; not found: {', '.join(self.missing())}" if self.missing() else "")

    def place(self, key: str) -> Place:
        """Where `key` is read: a part ("z.1", "final", "embed"), or any module or hook-point name as it is."""
        if key in ("final", "embed"):
            if getattr(self, key) is None:
                self.require([key], "this lens")
            return getattr(self, key)
        part, _, layer = key.rpartition(".")
        if part not in PARTS:
            return Place.parse(key)
        if not layer.isdigit():
            raise AnatomyError(f"part {key!r} is invalid: allowed PART.LAYER with PART in {PARTS}, 'embed' or 'final'")
        self.require([part], "this lens")
        if not 0 <= int(layer) < self.n_layers:
            raise AnatomyError(f"layer {layer} of part {key!r} is out of range: allowed 0 <= layer < {self.n_layers}")
        return self.places[part][int(layer)]

    def check_head(self, layer: int, head: int) -> None:
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
            raise AnatomyError(f"head ({layer}, {head}) is out of range: allowed layer < {self.n_layers}, "
                               f"head < {self.n_heads}")

    # ----- reading and editing -----
    def subject(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the activation lenses run: a bridged copy of a Hugging Face model, else the model."""
        from mechlrmc.bridge import bridge

        return bridge(model) if self.bridged else model

    @contextlib.contextmanager
    def hooks(self, model: torch.nn.Module, read: Iterable[str] = (), edit: dict[str, Callable] | None = None,
              grad: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block, a forward of `model` fills the yielded dict with the parts in `read` and
        replaces each part in `edit` by `fn(part)` (shapes as in the module docstring). `grad`: the read
        values keep their graph (and require grad, so gradients reach them even in a frozen model)."""
        acts: dict[str, torch.Tensor] = {}
        read, edit = list(read), dict(edit or {})
        by_place: dict[Place, list[str]] = {}
        for key in dict.fromkeys([*read, *edit]):
            by_place.setdefault(self.place(key), []).append(key)

        def act(place: Place, keys: list[str], raw: Any) -> Any:
            value = place.value(raw)
            for key in keys:
                if key in edit:
                    value = edit[key](value)
            if grad and not value.requires_grad and torch.is_grad_enabled():
                value = value.detach().requires_grad_()
            for key in keys:
                if key in read:
                    acts[key] = value if grad else value.detach()
            return place.replace(raw, value) if (grad or any(k in edit for k in keys)) else None

        points = getattr(model, "hook_dict", {})  # TransformerLens hook points: their own hooks (and conversions)
        modules = dict(model.named_modules())
        handles, tl_hooks = [], []
        for place, keys in by_place.items():
            if place.module in points and place.side == "output" and place.index is None:
                tl_hooks.append((place.module, lambda value, hook, place=place, keys=keys: act(place, keys, value)))
            elif place.module not in modules:
                raise AnatomyError(f"site {place.module!r} is not a submodule of {type(model).__name__}")
            elif place.side == "input":
                handles.append(modules[place.module].register_forward_pre_hook(
                    lambda m, args, place=place, keys=keys: act(place, keys, args)))
            else:
                handles.append(modules[place.module].register_forward_hook(
                    lambda m, args, out, place=place, keys=keys: act(place, keys, out)))
        try:
            with model.hooks(fwd_hooks=tl_hooks) if tl_hooks else contextlib.nullcontext():
                yield acts
        finally:
            for handle in handles:
                handle.remove()

    def run(self, model: torch.nn.Module, tokens: torch.Tensor, read: Iterable[str] = (),
            edit: dict[str, Callable] | None = None, grad: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward of `model` (the subject) on `tokens`: (logits, {part: value}) with `edit` applied."""
        from mechlrmc.measures import logits_of

        read = list(read)
        with torch.set_grad_enabled(grad or torch.is_grad_enabled()), self.hooks(model, read, edit, grad) as acts:
            logits = logits_of(model)(tokens)
        unread = [k for k in read if k not in acts]
        if unread:
            raise AnatomyError(f"part {unread[0]!r} at {self.place(unread[0]).module!r} is never called in the forward of "
                               f"{type(model).__name__}: allowed a submodule that runs in the forward")
        return logits, acts

    def patterns(self, acts: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The read patterns of every layer as [batch, head, query, key]."""
        return [acts[f"pattern.{l}"] if acts[f"pattern.{l}"].dim() == 4 else acts[f"pattern.{l}"][:, None]
                for l in range(self.n_layers)]

    # ----- components -----
    def params(self, spec: str | Iterable[str], param_names: Iterable[str]) -> list[str]:
        """The parameter names (in `param_names` order) a component spec selects (`mechlrmc.components`).
        mechlrmc's own model has the whole vocabulary; another model has the groups its anatomy derived
        (`attn`, `attn.L`, `mlp`, `mlp.L`, `embeddings`, `ln_final`, `unembed`, `all`), each with `~`."""
        from mechlrmc.components import component_params, parse_spec

        param_names = list(param_names)
        if self.source == "mechlrmc":
            return component_params(spec, param_names, self.n_layers)
        chosen: set[str] = set()
        for name in parse_spec(spec):
            hits = set(self._group(name.lstrip("~"), param_names))
            chosen |= set(param_names) - hits if name.startswith("~") else hits
        return [p for p in param_names if p in chosen]

    def _group(self, name: str, param_names: list[str]) -> list[str]:
        if name == "all":
            return param_names
        layered = [g for g in self.groups if g.startswith(name + ".")]
        names = self.groups.get(name) or tuple(p for g in layered for p in self.groups[g])
        if not names:
            allowed = sorted({*self.groups, *{g.split(".")[0] for g in self.groups}, "all"})
            raise OptionError(f"component {name!r} is not in the anatomy of {self.model_name}: allowed {allowed} "
                              f"and '~' for the complement")
        return [p for p in param_names if p in set(names)]

    def component_names(self) -> list[str]:
        """The groups of this anatomy (for norms and the per-component LLC)."""
        return list(self.groups)

    @classmethod
    def of(cls, model: torch.nn.Module, sites: Any = None) -> Anatomy:
        """The anatomy of `model` (see the module docstring); `sites` the recorder's named sites."""
        return derive(model, sites)


# ----- derivation -----
def _hook_layers(names: Iterable[str], suffix: str) -> int:
    pattern = re.compile(rf"blocks\.(\d+)\.{re.escape(suffix)}")
    return 1 + max((int(m.group(1)) for n in names if (m := pattern.fullmatch(n))), default=-1)


def _own_groups(model: torch.nn.Module, n_layers: int) -> dict[str, tuple[str, ...]]:
    from mechlrmc.components import component_params

    names = [n for n, _ in model.named_parameters()]
    groups = {f"{kind}.{l}": tuple(component_params(f"{kind}.{l}", names, n_layers))
              for l in range(n_layers) for kind in ("attn", "mlp")}
    for name in ("embeddings", "embed", "pos_embed", "ln_final", "unembed"):
        groups[name] = tuple(component_params(name, names, n_layers))
    return {k: v for k, v in groups.items() if v}


def _from_hook_points(model: torch.nn.Module) -> Anatomy:
    names = set(model.hook_dict)
    n_layers = _hook_layers(names, "attn.hook_pattern")
    cfg = model.cfg
    own = getattr(model, "anatomy_source", None) == "mechlrmc"  # `HookedEncoder` says so
    post = own and cfg.norm == "post"
    resid = "hook_normalized_resid_post" if post else "hook_resid_post"
    places = {"resid": resid, "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
              "pattern": "attn.hook_pattern", "z": "attn.hook_z"}
    found = {part: tuple(Place(f"blocks.{l}.{hook}") for l in range(n_layers))
             for part, hook in places.items() if f"blocks.0.{hook}" in names}
    if own:  # the final LayerNorm's output (pre-LN), else the last block's normalized output
        final = Place("ln_final") if model.ln_final is not None else Place(f"blocks.{n_layers - 1}.{resid}")
    else:
        final = Place("ln_final.hook_normalized") if "ln_final.hook_normalized" in names else None
    embed = Place("blocks.0.hook_resid_pre") if "blocks.0.hook_resid_pre" in names else None
    return Anatomy(n_layers, cfg.n_heads, found, final, embed, _own_groups(model, n_layers) if own else {},
                   "mechlrmc" if own else "transformer_lens", type(model).__name__,
                   pattern_kind="linear" if getattr(cfg, "attention", "softmax") == "linear" else "softmax")


def _from_bridge(model: torch.nn.Module) -> Anatomy:
    from mechlrmc.bridge import bridged, hf_groups

    wrapped, paths = bridged(model)
    found = _from_hook_points(wrapped)
    return Anatomy(found.n_layers, wrapped.cfg.n_heads, found.places, found.final, found.embed,
                   hf_groups(model, wrapped, paths), "transformers", type(model).__name__, bridged=True)


def _named(model: torch.nn.Module, raw: dict) -> Anatomy:
    """From the recorder's sites of a plain module (see the module docstring)."""
    from mechlrmc.sites import layer_names

    modules = dict(model.named_modules())
    hidden = dict(raw.get("hidden") or {})
    layered = [hidden[str(l)] for l in range(len(hidden)) if str(l) in hidden]
    templates = {"resid": raw.get("resid") or layered or None, "attn_out": raw.get("attn_out"), "mlp_out": raw.get("mlp_out"),
                 "pattern": raw.get("attention"), "z": raw.get("z")}
    n_layers = 0
    for text in templates.values():
        if isinstance(text, str) and "{L}" in text:
            n_layers = max(n_layers, len(layer_names(text, modules)))
        elif isinstance(text, (list, tuple)):
            n_layers = max(n_layers, len(text))
    heads = int(raw.get("heads", 0) or 0)
    places: dict[str, tuple[Place, ...]] = {}
    for part, text in templates.items():
        if not text or (isinstance(text, str) and "{L}" not in text and n_layers != 1):
            continue
        listed = [text.replace("{L}", str(l)) for l in range(n_layers)] if isinstance(text, str) else list(text)
        if len(listed) != n_layers:
            continue
        places[part] = tuple(Place.parse(t, "input" if part == "z" else "output", heads if part == "z" else 0)
                             for t in listed)
    if "z" in places and not heads:
        raise AnatomyError("sites name 'z' without 'heads': allowed {'z': 'blocks.{L}.attn.out', 'heads': N} (the "
                           "number of heads the out projection's input holds)")
    final = raw.get("final") or hidden.get("final")
    names = [n for n, _ in model.named_parameters()]
    groups: dict[str, tuple[str, ...]] = {}
    for part, kind in (("attn_out", "attn"), ("mlp_out", "mlp")):
        for l, place in enumerate(places.get(part, ())):
            groups[f"{kind}.{l}"] = tuple(n for n in names if n.startswith(place.module + "."))
    for name, paths in (raw.get("components") or {}).items():
        paths = [paths] if isinstance(paths, str) else list(paths)
        groups[name] = tuple(n for n in names if any(n == p or n.startswith(p + ".") for p in paths))
    if final:
        groups.setdefault("ln_final", tuple(n for n in names if n.startswith(final.split(":")[0] + ".")))
    pattern_kind = str(raw.get("pattern_kind", "softmax"))
    embed = Place(places["resid"][0].module, "input") if "resid" in places else None
    return Anatomy(n_layers, heads or int(raw.get("n_heads", 1) or 1), places, Place.parse(final) if final else None, embed,
                   {k: v for k, v in groups.items() if v}, "named", type(model).__name__, pattern_kind=pattern_kind)


def derive(model: torch.nn.Module, sites: Any = None) -> Anatomy:
    """The anatomy of `model`: its hook points, a TransformerBridge, or the named sites."""
    if "blocks.0.attn.hook_pattern" in getattr(model, "hook_dict", {}):
        return _from_hook_points(model)
    from mechlrmc.bridge import supports

    if supports(model):
        return _from_bridge(model)
    raw = sites.to_dict() if hasattr(sites, "to_dict") else dict(sites or {})
    return _named(model, raw)


def subject_of(model: torch.nn.Module, anatomy: Anatomy | None = None) -> tuple[torch.nn.Module, Anatomy]:
    """(the module a lens runs, its anatomy): with `anatomy` given, `model` is already the subject (as
    `Context.walk(..., anatomy=True)` passes it); else the anatomy is derived and a Hugging Face model
    bridged. Every activation lens starts with this line."""
    if anatomy is not None:
        return model, anatomy
    anatomy = derive(model)
    return anatomy.subject(model), anatomy
