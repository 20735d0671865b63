"""Sites: where the measures read a model's internals, by name, on any model.

A site is the name of a submodule (`model.get_submodule(name)`); its output is read with an
ordinary PyTorch forward hook, so the same code reads mechlrmc's own model (whose TransformerLens
hook points are submodules too: `blocks.0.attn.hook_pattern`), a TransformerLens model, a Hugging
Face model or a user's plain `nn.Module` (`transformer.ln_f`). Two kinds:

- `hidden`: {label: name} of sites whose output is a hidden state `[batch, pos, d]` (collapse, P2,
  is measured at each; the label "final" names the state the read-out sees);
- `attention`: names of sites whose output is an attention pattern `[batch, heads, query, key]`
  (or `[batch, query, key]` for one head), one per layer (attention on the optimal map, P3).

A model exposes what it exposes: a measure whose site is missing is NaN and the report says so
in one line; nothing is guessed. A name that is not a submodule is a `SiteError` naming the close
ones. For a module that returns a tuple, the site's value is its first element.

    sites = Sites(hidden={"final": "ln_f"}, attention=("blocks.0.attn.probs",))
    logits, acts = sites.capture(model, tokens)      # acts["ln_f"]: [batch, pos, d]
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import torch

from mechlrmc.errors import UsageError


def layer_names(template: str, modules: dict[str, Any]) -> list[str]:
    """`template` ("blocks.{L}.attn.pattern", optionally ending in ":I") written out for L = 0, 1, ...
    as long as the module it names is in `modules` (a model's `named_modules()`)."""
    out = []
    while template.replace("{L}", str(len(out))).split(":")[0] in modules:
        out.append(template.replace("{L}", str(len(out))))
    return out


class SiteError(UsageError, ValueError):
    """A site name that is not a submodule of the model, or a site whose output has the wrong shape."""


ANATOMY_KEYS = ("resid", "attn_out", "mlp_out", "z", "heads", "components", "pattern_kind")  # `mechlrmc.anatomy`


@dataclass(frozen=True)
class Sites:
    hidden: dict[str, str] = field(default_factory=dict)  # label -> submodule name
    attention: tuple[str, ...] = ()
    anatomy: dict[str, Any] = field(default_factory=dict)  # the other parts a plain module names (`mechlrmc.anatomy`)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Sites:
        """From `{"hidden": {label: name}, "attention": [name, ...]}`; also the short form
        `{"final": name, "attention": [...]}`, where every key but `attention` is a hidden site."""
        raw = dict(raw or {})
        anatomy = {key: raw.pop(key) for key in ANATOMY_KEYS if key in raw}
        attention = raw.pop("attention", ())
        hidden = raw.pop("hidden", {})
        if isinstance(attention, str):
            attention = (attention,)
        if not isinstance(hidden, dict) or not all(isinstance(v, str) for v in {**hidden, **raw}.values()):
            raise SiteError(f"sites={raw!r} are invalid: allowed {{'final': 'module.name', 'attention': "
                            f"['module.name', ...]}} (names of submodules)")
        return cls(hidden={**hidden, **raw}, attention=tuple(attention), anatomy=anatomy)

    def to_dict(self) -> dict[str, Any]:
        return {"hidden": dict(self.hidden), "attention": list(self.attention), **self.anatomy}

    def resolve(self, model: torch.nn.Module) -> Sites:
        """Templates with `{L}` (`"blocks.{L}.attn.pattern"`) written out for every layer of `model`,
        and `resid`'s blocks added as hidden sites "0", "1", ... (collapse at every layer)."""
        modules = dict(model.named_modules())

        def expand(name: str) -> list[str]:
            return layer_names(name, modules) if "{L}" in name else [name]

        attention = tuple(n for name in self.attention for n in expand(name))
        anatomy = {k: (expand(v) if isinstance(v, str) and k != "pattern_kind" else v) for k, v in self.anatomy.items()}
        hidden = dict(self.hidden)
        for layer, name in enumerate(anatomy.get("resid", ())):
            hidden.setdefault(str(layer), name)
        return Sites(hidden=hidden, attention=attention, anatomy=anatomy)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Sites:
        """The sites a model declares (`model.sites()`, as mechlrmc's own model does: each block's
        output, the final LayerNorm as "final", every layer's attention pattern); none for a model
        that declares none (give them by name)."""
        declared = getattr(model, "sites", None)
        return declared() if callable(declared) else cls()

    @classmethod
    def auto(cls, model: torch.nn.Module) -> Sites:
        """`sites="auto"`: the sites derived from the model's anatomy (`mechlrmc.anatomy`), read in the
        user's loop without changing the model. mechlrmc's model and TransformerLens models: their hook
        points; a Hugging Face model the TransformerBridge supports: each block's output and the final
        LayerNorm at their module paths (its patterns are read at analysis time, on a bridged copy of
        each checkpoint); a plain module: none (name them)."""
        if callable(getattr(model, "sites", None)):
            return cls.of(model)
        from mechlrmc.bridge import hf_sites

        return cls.from_dict(hf_sites(model))

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.hidden.values(), *self.attention]))

    @property
    def final(self) -> str | None:
        """The hidden site the read-out sees: "final", else the last one listed (None: no hidden site)."""
        if "final" in self.hidden:
            return self.hidden["final"]
        return list(self.hidden.values())[-1] if self.hidden else None

    def check(self, model: torch.nn.Module) -> None:
        """Every site is a submodule of `model`; else one line naming it and the close names."""
        modules = dict(model.named_modules())
        for name in self.names:
            if name not in modules:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=4, cutoff=0.5)
                some = close or [n for n in modules if n][:6]
                raise SiteError(f"site {name!r} is not a submodule of {type(model).__name__}: allowed submodule "
                                f"names such as {some}")

    def capture(self, model: torch.nn.Module, tokens: torch.Tensor, names: list[str] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward of `model` on `tokens`: (its output as logits, {site name: output}) for the
        sites `names` (default all); a site the forward never calls is a one-line `SiteError`."""
        from mechlrmc.measures import logits_of

        names = self.names if names is None else names
        self.check(model) if names else None
        acts: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(module, inputs, output):
                acts[name] = (output[0] if isinstance(output, (tuple, list)) else output).detach()
            return hook

        handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
        try:
            logits = logits_of(model)(tokens)
        finally:
            for handle in handles:
                handle.remove()
        uncalled = [name for name in names if name not in acts]
        if uncalled:
            raise SiteError(f"site {uncalled[0]!r} of {type(model).__name__} is never called in its forward (no "
                            f"output to read): allowed submodules that run in the forward (an attention pattern "
                            f"site where the model computes its pattern)")
        return logits, acts

    def patterns(self, acts: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The attention sites' outputs as `[batch, heads, query, key]`."""
        out = []
        for name in self.attention:
            pattern = acts[name]
            if pattern.dim() == 3:
                pattern = pattern[:, None]
            if pattern.dim() != 4 or pattern.shape[-1] != pattern.shape[-2]:
                raise SiteError(f"attention site {name!r} gives shape {tuple(acts[name].shape)}: allowed "
                                f"[batch, heads, query, key] or [batch, query, key] (a pattern)")
            out.append(pattern)
        return out
