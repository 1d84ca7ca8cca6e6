"""Where a training step's device time goes: a kernel table per workload, to explain a measured gap.

    python -m pha_lab.bench.profile gpt2_reference transformer_125m --seq-len 1024 --batch 12 --compile

Each workload (a name as `pha_lab.bench.workloads` reads it) is built, optionally compiled, warmed up and then
profiled for `--steps` training steps (the bench's own step: forward, loss, backward, fused AdamW) under
`torch.profiler`. The table groups the kernels into coarse classes (matmul, attention, FFT, optimizer, the
loss's chunk kernels, other fused Triton kernels, copies) by their names and prints milliseconds per step for
each class, then the top kernels by device time. A gap between two models is then read off as the classes that
differ (every gap between a floor and a measurement should be explained). CPU runs profile CPU time (a smoke test).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from pha_lab.bench.timing import autocast, percentiles, time_steps
from pha_lab.bench.workloads import build_step, make_optimizer, make_workload

# first match wins; names as cuBLAS/cuDNN/flash/cuFFT/Inductor/ATen give them to their kernels
KERNEL_CLASSES = [
    ("attention", r"flash|fmha|attention|sdpa"),
    ("fft", r"fft|radix|regular_fft|vector_fft|c2r|r2c"),
    ("matmul", r"gemm|sm90_xmma|cutlass|cublas|nvjet|matmul|mma|aten::(mm|addmm|bmm)$"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("loss", r"chunk|nll|log_softmax|cross_entropy|logsumexp"),
    ("copy", r"copy|memcpy|memset|cat_|to_copy|fill"),
    ("triton (fused)", r"^triton_"),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, pattern in KERNEL_CLASSES:
        if re.search(pattern, low):
            return label
    return "other (eager elementwise, reductions)"


def profile_workload(
    name: str, seq_len: int, batch: int, compile_: bool, steps: int, device: torch.device, top: int
) -> str:
    """The class table and top kernels of `steps` profiled training steps of workload `name`."""
    torch.manual_seed(0)
    workload = make_workload(name, device, seq_len)
    module = workload.module.train()
    fwd = torch.compile(module) if compile_ else module
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [workload.batch(batch, seq_len, device, gen) for _ in range(2)]
    amp = autocast(device, torch.bfloat16)
    step = build_step("train", workload, fwd, make_optimizer(module, device), batches, amp)
    median_ms = percentiles(time_steps(step, 5, 10, device))[1]
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    events = [e for e in prof.key_averages() if not cuda or e.device_type.name == "CUDA"]  # GPU: kernels only
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    per_class: dict[str, float] = defaultdict(float)
    kernels = []
    for e in events:
        us = getattr(e, attr, 0.0) or 0.0
        if us <= 0 or (not cuda and e.key.startswith("ProfilerStep")):
            continue
        per_class[kernel_class(e.key)] += us
        kernels.append((us, e.count, e.key))
    total = sum(per_class.values())
    lines = [
        f"## {name}  T={seq_len} B={batch} compile={compile_}  timed step {median_ms:.2f} ms (median of 10), "
        f"profiled {'device' if cuda else 'CPU'} time {total / 1e3 / steps:.2f} ms per step"
    ]
    for label, us in sorted(per_class.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {label:<40} {us / 1e3 / steps:8.2f} ms/step  {100 * us / total:5.1f} %")
    lines.append(f"  top {top} kernels (ms/step, calls/step):")
    for us, count, key in sorted(kernels, reverse=True)[:top]:
        lines.append(f"    {us / 1e3 / steps:7.3f}  {count / steps:5.1f}  {key[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", help="workloads, e.g. gpt2_reference transformer_125m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--compile", action="store_true", help="torch.compile each workload (as the targets part)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    for name in a.names:
        print(profile_workload(name, a.seq_len, a.batch, a.compile, a.steps, torch.device(a.device), a.top), flush=True)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
