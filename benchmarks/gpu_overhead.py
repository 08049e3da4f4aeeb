"""GPU check: a GPT-2-small-sized transformer training step in bf16, plain against watched.

    python benchmarks/gpu_overhead.py [--steps 50] [--layers 12] [--d 768] [--seq 1024] [--batch 8]

Plain and watched copies of the model; steps interleaved one by one (alternating which goes
first), each timed with CUDA events; medians compared. The watched steps run under
torch.cuda.set_sync_debug_mode("error"), so any host-device sync in deadwatch's hooks or in
monitor.step() raises (the report, which is allowed one transfer, is not inside them).
`--device cpu` with small sizes checks the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import deadwatch


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.act = nn.GELU(approximate="tanh")
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(a)
        return x + self.out(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, vocab: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    plain = GPT(args.layers, args.d, args.heads, args.vocab, args.seq).to(device)
    watched = copy.deepcopy(plain)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    target = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    def make_step(model: nn.Module, monitor: deadwatch.Monitor | None = None):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> float:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            if monitor is not None and cuda:
                torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    logits = model(idx)
                loss = F.cross_entropy(logits.float().view(-1, args.vocab), target.view(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if monitor is not None:
                    monitor.step()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
            if cuda:
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1e3
            return time.perf_counter() - t0
        return step

    with deadwatch.watch(watched, reporters=[], report_every=10**9) as monitor:
        plain_step, watched_step = make_step(plain), make_step(watched, monitor)
        p_times, w_times = [], []
        for i in range(args.warmup + args.steps):
            if i % 2:
                tw, tp = watched_step(), plain_step()
            else:
                tp, tw = plain_step(), watched_step()
            if i >= args.warmup:
                p_times.append(tp)
                w_times.append(tw)
        report = monitor.report()  # outside the sync-checked steps: the one transfer of a report
    p, w = statistics.median(p_times), statistics.median(w_times)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.layers} layers, d={args.d}, seq {args.seq}, batch {args.batch}, "
          f"bf16 autocast, {args.steps} paired steps")
    print(f"plain {1e3 * p:.2f} ms, watched {1e3 * w:.2f} ms, ratio {w / p:.4f}; "
          f"no host sync in {args.steps + args.warmup} watched steps (sync debug mode 'error'{'' if cuda else ': CUDA only'})")
    print(f"{len(report.layers)} sites, {report.units} units, {100 * report.dead_fraction:.2f}% dead")


if __name__ == "__main__":
    main()
