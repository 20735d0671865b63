"""A model and a training loop that mechlrmc did not write, recorded with `mechlrmc.Recorder`.

The model is a minGPT-style causal transformer with *linear* attention, the plateau paper's setting
(docs/FINDINGS.md, P0): pre-LayerNorm blocks, scores QK^T / sqrt(d_head) with the entries above the
diagonal set to 0 and no softmax, a final LayerNorm and an un-biased head. The loop is a plain
PyTorch loop on moving-window sums (MWS) drawn here, Adam at 1e-4, batch 256, next-token
cross-entropy on every position. Three lines hand it to mechlrmc: the `Recorder`, `rec.step`, and
the sites it reads (`sites`: the module paths of the model's anatomy, so that every lens applies: the
head taxonomy, attention views, ablation, patching, probes, swaps).

    python docs/examples/mingpt_mws.py --out runs/mingpt_mws          # ~400 steps, a few minutes on one core
    mechlrmc report runs/mingpt_mws -o mingpt_mws.html                # plateau, drop, heads, patching, probes

`build` is the model factory the recorder stores ("docs/examples/mingpt_mws.py:build"), so
`Run("runs/mingpt_mws").load_model(step)` and every analysis rebuild the model from the checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class LinearCausalAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.pattern = nn.Identity()  # [B, nh, T, T]: a named module, so a forward hook can read the pattern

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = self.pattern(scores.masked_fill(future, 0.0))  # linear attention: no softmax
        return self.out((att @ v).transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc, self.proj = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = LinearCausalAttention(d_model, n_heads)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.zeros(block_size, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        for name, p in self.named_parameters():  # minGPT's init
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2 or name == "pos":
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn.out.weight", "proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> logits (B, T, vocab)
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build(length: int = 16, max_value: int = 16, d_model: int = 256, n_layers: int = 1, n_heads: int = 1) -> GPT:
    """The model for MWS with `length` inputs in 1..`max_value` (separator max_value + 1)."""
    return GPT(vocab_size=max_value + 2, block_size=2 * length, d_model=d_model, n_layers=n_layers, n_heads=n_heads)


def sites(n_heads: int) -> dict:
    """Where mechlrmc reads this model (`mechlrmc.anatomy`), `{L}` for every layer: the final LayerNorm,
    the pattern module, each block, its attention and MLP outputs, and the heads' outputs `z` as the
    input of the attention's out projection; linear attention; the embeddings and the read-out."""
    return {"final": "ln_f", "attention": "blocks.{L}.attn.pattern", "resid": "blocks.{L}", "attn_out": "blocks.{L}.attn",
            "mlp_out": "blocks.{L}.mlp", "z": "blocks.{L}.attn.out", "heads": n_heads, "pattern_kind": "linear",
            "components": {"embeddings": ["tok", "pos"], "unembed": "head"}}


def mws_batch(generator: torch.Generator, batch: int, length: int, max_value: int) -> torch.Tensor:
    """[batch, 2L + 1]: L inputs, the separator, the L outputs y_1 = x_1, y_j = (x_{j-1} + x_j) mod p."""
    p = max_value + 1
    x = torch.randint(1, max_value + 1, (batch, length), generator=generator)
    y = torch.cat([x[:, :1], (x[:, 1:] + x[:, :-1]) % p], dim=1)
    return torch.cat([x, torch.full((batch, 1), p), y], dim=1)


def train(out: str | Path | None, steps: int = 400, seed: int = 0, length: int = 16, max_value: int = 16,
          batch: int = 256, lr: float = 1e-4, eval_every: int = 5, record: bool = True,
          log: str = "none") -> tuple[GPT, list[float]]:
    """The loop; with `record` (and `out`), recorded by mechlrmc. Returns the model and its training losses."""
    torch.manual_seed(seed)
    kwargs = dict(length=length, max_value=max_value)
    model = build(**kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.Generator().manual_seed(seed + 1)
    losses = []
    recorder = contextlib.nullcontext()
    if record:
        from mechlrmc import Recorder
        from mechlrmc.tasks.mws import MWSConfig

        recorder = Recorder(out, model, model_factory=f"{_here()}:build", factory_kwargs=kwargs,
                            task=MWSConfig(length=length, max_value=max_value, modulus=max_value + 1),
                            sites=sites(n_heads=1), optimizer=opt,
                            checkpoints="log", dense=(min(50, steps), steps), dense_every=10, eval_every=eval_every, steps=steps,
                            log=log)
    with recorder as rec:
        for step in range(1, steps + 1):
            seq = mws_batch(data, batch, length, max_value)
            logits = model(seq[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if rec is not None:
                rec.step(step, loss=losses[-1])
    return model, losses


def _here() -> str:
    """This file, relative to the working directory where it lies below it (a portable factory)."""
    path = Path(__file__).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train(args.out, args.steps, args.seed, args.length)
    print(f"recorded {args.out}: mechlrmc report {args.out} -o report.html")
