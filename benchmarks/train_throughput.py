"""Training steps per second: HookedEncoder vs transformers.BertModel, same config, weights and data.

    python benchmarks/train_throughput.py --preset cpu --threads 1          # CPU
    python benchmarks/train_throughput.py --preset paper --device cuda --bf16

Contestants, all with identical weights (ours imported from the HF model) and the same batches:
  HookedEncoder          the trainer's default path: eager, Adam `foreach` (`train.adam`)
  HookedEncoder+compile  `train.compile=true` and `train.adam="fused"` (skip with --no-compile)
  BertModel[eager|sdpa]  the reference (HF BertModel + Linear read-out) with each attention
                         implementation and fused Adam; the faster of the two is "the reference"
Every step is what `Trainer.train_step` does: forward, the three losses, zero_grad, backward and
an Adam step. The contestants are timed in alternating blocks within one process, so machine
noise hits all alike; each figure is the median block. `--clock cpu` times the process' CPU
time instead of wall time (meaningful at one thread only; robust when other jobs share the cores).

Also prints the matrix-product floor: the step's matmul FLOPs over the best sgemm rate measured
on the step's own shapes, and which fraction of that limit each contestant reaches.
The last line ends with the best HookedEncoder / reference ratio of steps per second, as `1.16x`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import BertConfig, BertModel

from mechlrmc.config import RunConfig, preset
from mechlrmc.convert import from_reference_state_dict
from mechlrmc.tasks.lrmc import sample, split_losses
from mechlrmc.train import make_optimizer


class Reference(torch.nn.Module):
    """The paper's model: HF BertModel plus a Linear(d, 1) read-out."""

    def __init__(self, cfg: RunConfig, attn_implementation: str = "eager"):
        super().__init__()
        self._backbone = BertModel(BertConfig(
            vocab_size=cfg.data.vocab_size, hidden_size=cfg.model.d_model,
            num_hidden_layers=cfg.model.n_layers, num_attention_heads=cfg.model.n_heads,
            intermediate_size=cfg.model.d_mlp, max_position_embeddings=cfg.n_ctx, type_vocab_size=1,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn_implementation,
        ), add_pooling_layer=False)
        self.read_out = torch.nn.Linear(cfg.model.d_model, 1)

    def forward(self, tokens):
        return self.read_out(self._backbone(input_ids=tokens).last_hidden_state).squeeze(-1)


def step_matmul_flops(cfg: RunConfig) -> float:
    """Matrix-product FLOPs of one training step (forward x 3: backward needs dX and dW)."""
    m, b, p = cfg.model, cfg.train.batch_size, cfg.n_ctx
    n = b * p
    per_layer = (2 * n * m.d_model * 3 * m.d_model + 2 * n * m.d_model * m.d_model  # QKV, O
                 + 2 * 2 * n * m.d_model * m.d_mlp  # MLP in and out
                 + 2 * 2 * b * m.n_heads * p * p * m.d_head)  # scores and pattern @ V
    return 3 * (m.n_layers * per_layer + 2 * n * m.d_model)


def sgemm_rate(cfg: RunConfig, device: torch.device, clock=time.perf_counter, reps: int = 50) -> float:
    """Best FLOP/s of torch.mm over the step's linear-layer shapes [batch*pos, in] @ [in, out]."""
    m = cfg.model
    n = cfg.train.batch_size * cfg.n_ctx
    best = 0.0
    for k, o in ((m.d_model, m.d_model), (m.d_model, 3 * m.d_model), (m.d_model, m.d_mlp), (m.d_mlp, m.d_model)):
        a, w = torch.randn(n, k, device=device), torch.randn(k, o, device=device)
        for _ in range(5):
            a @ w
        sync(device)
        rates = []
        for _ in range(5):
            start = clock()
            for _ in range(reps):
                a @ w
            sync(device)
            rates.append(2 * n * k * o * reps / (clock() - start))
        best = max(best, statistics.median(rates))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Contestant:
    """A model, its optimizer and its loss function, timed block by block."""

    def __init__(self, model, optimizer, forward, device, autocast: bool):
        self.model, self.optimizer, self.forward = model, optimizer, forward
        self.device, self.autocast = device, autocast
        self.times: list[float] = []

    def steps(self, batches, clock) -> float:
        """Seconds per training step over `batches`."""
        sync(self.device)
        start = clock()
        for b in batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = split_losses(self.forward(b.tokens), b.values, b.observed)["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        sync(self.device)
        return (clock() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu", choices=["cpu", "paper", "tiny"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the preset's, else torch's default)")
    parser.add_argument("--block", type=int, default=20, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks per contestant")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--no-compile", action="store_true", help="leave out HookedEncoder+compile")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall time, or process CPU time")
    args = parser.parse_args()
    for name in ("threads", "block", "rounds"):
        low = 0 if name == "threads" else 1
        if getattr(args, name) < low:
            print(f"--{name}={getattr(args, name)} is out of range: allowed an integer >= {low}", file=sys.stderr)
            sys.exit(2)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device=cuda but no CUDA device is available: allowed auto or cpu", file=sys.stderr)
        sys.exit(2)

    cfg = preset(args.preset)
    threads = args.threads or cfg.train.threads
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    torch.manual_seed(0)
    references = {impl: Reference(cfg, impl) for impl in ("eager", "sdpa")}
    references["sdpa"].load_state_dict(references["eager"].state_dict())
    state = references["eager"].state_dict()
    contestants: dict[str, Contestant] = {}
    for name, variant in (("HookedEncoder", {}), ("HookedEncoder+compile", {"train.compile": True, "train.adam": "fused"})):
        if variant and args.no_compile:
            continue
        run_cfg = cfg.override(variant)
        model = from_reference_state_dict(state, run_cfg).to(device).train()
        forward = torch.compile(model) if run_cfg.train.compile else model
        contestants[name] = Contestant(model, make_optimizer(model, run_cfg), forward, device, args.bf16)
    for impl, ref in references.items():
        ref.to(device).train()
        contestants[f"BertModel[{impl}]"] = Contestant(
            ref, torch.optim.Adam(ref.parameters(), lr=cfg.train.lr, fused=True), ref, device, args.bf16)

    gen = torch.Generator().manual_seed(0)
    batches = [sample(cfg.data, cfg.train.batch_size, gen).to(device) for _ in range(args.block)]
    warm_up = {}
    for name, c in contestants.items():
        start = time.perf_counter()
        c.steps(batches[:3], time.perf_counter)
        warm_up[name] = time.perf_counter() - start
    for _ in range(args.rounds):
        for c in contestants.values():
            c.times.append(c.steps(batches, clock))
    med = {name: statistics.median(c.times) for name, c in contestants.items()}

    flops = step_matmul_flops(cfg)
    rate = sgemm_rate(cfg, device, clock)
    floor = flops / rate
    print(f"preset={args.preset} device={device} threads={torch.get_num_threads()} batch={cfg.train.batch_size} "
          f"bf16={args.bf16} clock={args.clock} torch={torch.__version__}")
    print(f"  matmul work {flops / 1e9:.2f} GFLOP/step; best sgemm on the step's shapes {rate / 1e9:.1f} GFLOP/s "
          f"-> floor {floor * 1000:.1f} ms/step")
    for name, t in med.items():
        print(f"  {name:22s} {1 / t:7.2f} steps/s  {t * 1000:6.1f} ms/step  {floor / t:5.1%} of the sgemm limit  "
              f"(median of {args.rounds} blocks of {args.block}; first 3 steps {warm_up[name]:.1f} s)")
    ref_name = min((n for n in med if n.startswith("BertModel")), key=med.get)
    for name in (n for n in med if n.startswith("HookedEncoder")):
        print(f"  {name} / {ref_name}: {med[ref_name] / med[name]:.2f}x")
    best = min((n for n in med if n.startswith("HookedEncoder")), key=med.get)
    print(f"ratio {best} / {ref_name} steps per second: {med[ref_name] / med[best]:.2f}x")


if __name__ == "__main__":
    main()
