#!/usr/bin/env python
"""sdpa's kernels for the update's attention: forward + backward time per backend, and what a new length costs.

    python benchmarks/attention_kernels.py                 # a GPU: the Qwen2.5-0.5B attention shape
    python benchmarks/attention_kernels.py --device cpu --shapes 2x64 --backends math   # checks the script

For each batch × length, causal `scaled_dot_product_attention` with 14 query heads and 2 key/value
heads of width 64 (as transformers calls it for Qwen2.5-0.5B: `enable_gqa`), and with the key/value
heads repeated to 14, through one backend at a time (flash, memory-efficient, cuDNN, math): the first
call (a cuDNN plan is built there) and the median of `--iters` more, forward and backward, in bf16;
"× 24 layers" is what the model's attention would take per update.  Then cuDNN at lengths the
process has not met, which is what every RL step brings (`creditrl`'s policy leaves cuDNN out of
scoring unless `model.scoring_attention=cudnn`, which rounds widths up to multiples of 128 so that
the plans are reused).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
QUERY_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 14, 2, 64, 24


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward_seconds(batch: int, length: int, backend: SDPBackend, grouped: bool, device: torch.device,
                             iters: int) -> tuple[float, float]:
    """(first call, median of `iters` more) seconds of one causal attention forward and backward."""
    kv_heads = KV_HEADS if grouped else QUERY_HEADS
    generator = torch.Generator(device).manual_seed(0)

    def randn(heads: int) -> torch.Tensor:
        return torch.randn(batch, heads, length, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=generator)

    q, k, v = randn(QUERY_HEADS).requires_grad_(), randn(kv_heads).requires_grad_(), randn(kv_heads).requires_grad_()
    grad_out = randn(QUERY_HEADS)

    def once() -> float:
        _sync(device)
        start = time.perf_counter()
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        out.backward(grad_out)
        _sync(device)
        return time.perf_counter() - start

    first = once()
    times = sorted(once() for _ in range(iters))
    return first, times[len(times) // 2]


def attention_flops(batch: int, length: int) -> float:
    """Causal forward (two matmuls over half the score matrix) and backward (2.5 times the forward)."""
    return 3.5 * 4 * batch * QUERY_HEADS * length * length * HEAD_DIM / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shapes", nargs="+", default=["8x1024", "4x4096", "16x2048"], metavar="BxT")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["flash", "efficient", "cudnn"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--new-lengths", nargs="*", type=int, default=[2000, 2016, 2040],
                        help="cuDNN at 16 rows of these lengths, each new to the process (GPU only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{'shape':>8} {'backend':>10} {'grouped kv':>10} {'first ms':>9} {'median ms':>9} "
          f"{'× 24 layers':>11} TFLOP/s")
    for shape in args.shapes:
        batch, length = (int(x) for x in shape.split("x"))
        for name in args.backends:
            for grouped in (True, False):
                try:
                    first, median = forward_backward_seconds(batch, length, BACKENDS[name], grouped, device, args.iters)
                except RuntimeError as err:  # a backend that cannot take these inputs says so and the table goes on
                    print(f"{shape:>8} {name:>10} {grouped!s:>10}  not available: {str(err).splitlines()[0][:80]}")
                    continue
                print(f"{shape:>8} {name:>10} {grouped!s:>10} {first * 1e3:9.1f} {median * 1e3:9.2f} "
                      f"{LAYERS * median * 1e3:11.1f} {attention_flops(batch, length) / median / 1e12:7.1f}")
    if device.type == "cuda":
        for length in args.new_lengths:
            first, median = forward_backward_seconds(16, length, SDPBackend.CUDNN_ATTENTION, False, device, 3)
            print(f"cuDNN, 16 × {length}, a length new to the process: first {first * 1e3:.1f} ms, "
                  f"then {median * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
