#!/usr/bin/python3
"""PyTorch reference for BenchmarkBlockTrainStep: one Llama-style block (RMSNorm,
RoPE causal attention, SwiGLU), fp32 on CPU, forward + backward + AdamW step.

Prints one JSON line: {"median_ms": ..., "steps": ..., "threads": ..., "gflops": ...}.
Run with Debian's python3-torch: /usr/bin/python3 bench/block_step.py [--bf16]

--bf16 runs the forward under torch.autocast("cpu", dtype=torch.bfloat16) with fp32
master weights, as a PyTorch user after speed would. OpenMP's threads are told to
sleep rather than spin when idle (OMP_WAIT_POLICY=PASSIVE, unless already set): on a
2-core machine spinning threads slow PyTorch by about 1.5x, and the comparison should
be against PyTorch at its best.
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP

import torch  # noqa: E402
import torch.nn.functional as F


class Block(torch.nn.Module):
    def __init__(self, d, heads, dff, seq, theta=10000.0, eps=1e-5):
        super().__init__()
        self.d, self.h, self.hd, self.eps = d, heads, d // heads, eps
        self.norm1 = torch.nn.Parameter(torch.ones(d))
        self.norm2 = torch.nn.Parameter(torch.ones(d))
        self.q = torch.nn.Linear(d, d, bias=False)
        self.k = torch.nn.Linear(d, d, bias=False)
        self.v = torch.nn.Linear(d, d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.gate = torch.nn.Linear(d, dff, bias=False)
        self.up = torch.nn.Linear(d, dff, bias=False)
        self.down = torch.nn.Linear(dff, d, bias=False)
        inv = 1.0 / (theta ** (torch.arange(0, self.hd, 2).float() / self.hd))
        freqs = torch.outer(torch.arange(seq).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos())
        self.register_buffer("sin", emb.sin())
        self.register_buffer("mask", torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1))

    def rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rope(self, x):
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2 :]
        return x * self.cos + torch.cat((-x2, x1), dim=-1) * self.sin

    def forward(self, x):
        b, t, _ = x.shape
        a = self.rms(x, self.norm1)
        q = self.q(a).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(a).view(b, t, self.h, self.hd).transpose(1, 2)
        v = self.v(a).view(b, t, self.h, self.hd).transpose(1, 2)
        q, k = self.rope(q), self.rope(k)
        # torch 1.13 (Debian) has no scaled_dot_product_attention: write it out.
        s = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        s = s.masked_fill(self.mask[:t, :t], float("-inf"))
        att = torch.softmax(s, dim=-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(b, t, self.d))
        m = self.rms(x, self.norm2)
        return x + self.down(F.silu(self.gate(m)) * self.up(m))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dff", type=int, default=688)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast around the forward")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    blk = Block(args.d, args.heads, args.dff, args.seq)
    opt = torch.optim.AdamW(blk.parameters(), lr=1e-3, weight_decay=0.1)
    x = torch.randn(args.batch, args.seq, args.d)
    dout = torch.randn(args.batch, args.seq, args.d) * 1e-3
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        with ctx:
            y = blk(x)
        y.float().backward(dout)
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    n = args.batch * args.seq
    proj = 2 * n * (4 * args.d * args.d + 3 * args.d * args.dff)
    attn = 2 * 2 * n * args.seq * args.d
    flops = 3 * (proj + attn)
    print(json.dumps({"median_ms": med * 1e3, "steps": args.steps, "threads": args.threads,
                      "torch": torch.__version__, "gflops": flops / med / 1e9, "bf16": args.bf16,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


if __name__ == "__main__":
    main()
