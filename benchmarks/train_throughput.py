"""Training steps per second: HookedEncoder vs transformers.BertModel, same config, weights and data.

    python benchmarks/train_throughput.py --preset cpu            # CPU
    python benchmarks/train_throughput.py --preset paper --device cuda

Both models get identical weights (ours imported from the HF model) and the same batches; their
steps are timed in alternating blocks within one process, so machine noise hits both alike.
Prints the ratio ours / reference (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertModel

from mechlrmc.config import preset
from mechlrmc.convert import from_reference_state_dict
from mechlrmc.data import sample
from mechlrmc.metrics import split_losses


class Reference(torch.nn.Module):
    """The paper's model: HF BertModel plus a Linear(d, 1) read-out."""

    def __init__(self, cfg):
        super().__init__()
        self._backbone = BertModel(BertConfig(
            vocab_size=cfg.data.vocab_size, hidden_size=cfg.model.d_model,
            num_hidden_layers=cfg.model.n_layers, num_attention_heads=cfg.model.n_heads,
            intermediate_size=cfg.model.d_mlp, max_position_embeddings=cfg.n_ctx, type_vocab_size=1,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
        ), add_pooling_layer=False)
        self.read_out = torch.nn.Linear(cfg.model.d_model, 1)

    def forward(self, tokens):
        return self.read_out(self._backbone(input_ids=tokens).last_hidden_state).squeeze(-1)


def time_steps(model, batches, device, autocast) -> float:
    """Seconds per training step over `batches`."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for b in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = split_losses(model(b.tokens), b.values, b.observed)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the preset's, else torch's default)")
    parser.add_argument("--block", type=int, default=20, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks per model")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = parser.parse_args()

    cfg = preset(args.preset)
    threads = args.threads or cfg.train.threads
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    reference = Reference(cfg)
    ours = from_reference_state_dict(reference.state_dict(), cfg)
    reference.to(device).train()
    ours.to(device).train()
    gen = torch.Generator().manual_seed(0)
    batches = [sample(cfg.data, cfg.train.batch_size, gen).to(device) for _ in range(args.block)]
    for model in (ours, reference):  # warm-up
        time_steps(model, batches[:3], device, args.bf16)
    times = {"HookedEncoder": [], "BertModel": []}
    for _ in range(args.rounds):
        times["HookedEncoder"].append(time_steps(ours, batches, device, args.bf16))
        times["BertModel"].append(time_steps(reference, batches, device, args.bf16))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"preset={args.preset} device={device} threads={torch.get_num_threads()} "
          f"batch={cfg.train.batch_size} bf16={args.bf16}")
    for name, t in med.items():
        print(f"  {name:14s} {1 / t:8.2f} steps/s  ({t * 1000:.1f} ms/step, median of {args.rounds} blocks of {args.block})")
    print(f"ratio HookedEncoder / BertModel steps per second: {med['BertModel'] / med['HookedEncoder']:.2f}")


if __name__ == "__main__":
    main()
