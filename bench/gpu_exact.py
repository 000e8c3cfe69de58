"""The exact engine's PyTorch implementation on a GPU: the same integers as the CPU, and its speed.

Run on the GPU machine (it needs only numpy and PyTorch with CUDA, not llama.cpp): a model
of SmolLM2-135M's shape with integer random weights (:func:`nacrith.exact.tiny.random_weights`,
the same on every machine) runs

1. 40 lockstep steps of 4 streams in a 32-token window (so that windows slide) on the GPU
   and on the CPU: the SHA-256 of all logits must be equal, and equal to ``--expect`` (the
   digest the C kernel computed on the development machine: ``--print-expect`` there);
2. one stream alone and the same stream among 299 others: the same logits (batch invariance);
3. the same digest through a CUDA graph of the whole window (``TorchContext.step_graph``);
4. lockstep steps with logits left on the GPU: eagerly at ``--eager-streams`` streams of
   1024-token windows (positions 1-16 and 897-912), and from the CUDA graph (whole windows)
   at ``--streams``: tokens per second.

With ``NACRITH_EXACT_TRITON=1`` the GPU step uses the fused Triton kernels
(:mod:`nacrith.exact.triton_step`). Exits 1 where a digest differs or a stream's logits
depend on its companions.

Usage: python bench/gpu_exact.py [--expect HEX] [--streams 256,1024,2048,4096] [--eager-streams 1024] [--out FOLDER] [--name NAME]
       python bench/gpu_exact.py --print-expect     (on the development machine: the C kernel)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from nacrith.exact import tiny  # noqa: E402

STREAMS, STEPS, CTX, SLIDE = 4, 40, 32, 8  # 40 steps in a 32-token window: two slides


def tokens_for(step: int, n: int) -> np.ndarray:
    return (np.arange(n) * 7919 + step * 104729) % 49152


def digest(context, graph: bool = False) -> str:
    """SHA-256 of the logits of STEPS lockstep steps of STREAMS streams (windows sliding)."""
    h, position = hashlib.sha256(), 0
    context.reset()
    for step in range(STEPS):
        if position == CTX:
            for stream in range(STREAMS):
                context.slide(stream, 1, SLIDE, CTX)
            position -= SLIDE
        if graph:
            logits = context.step_graph(tokens_for(step, STREAMS), np.full(STREAMS, position)).cpu().numpy()
        else:
            logits = context.step(tokens_for(step, STREAMS), np.full(STREAMS, position))
        h.update(np.ascontiguousarray(logits, np.int64).tobytes())
        position += 1
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expect", default=None)
    parser.add_argument("--print-expect", action="store_true")
    parser.add_argument("--streams", default="256,1024,2048,4096")
    parser.add_argument("--eager-streams", default="1024")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="gpu-exact", help="the results file in --out: NAME.json")
    args = parser.parse_args()
    weights = tiny.random_weights(tiny.smollm2_shape(), 1)
    if args.print_expect:
        from nacrith.exact import kernel

        print(digest(kernel.KernelContext(kernel.KernelModel(weights), STREAMS, CTX, 2)))
        return
    import torch

    from nacrith.exact.torch_engine import TorchContext, TorchModel

    torch.backends.cuda.matmul.allow_tf32 = False
    result = {"machine": f"{platform.machine()}; {torch.cuda.get_device_name(0)}; torch {torch.__version__}", "date": time.strftime("%Y-%m-%d"),
              "fused_kernels": os.environ.get("NACRITH_EXACT_TRITON") == "1"}
    gpu = TorchModel(weights, "cuda")
    began = time.perf_counter()
    result["digest_gpu"] = digest(TorchContext(gpu, STREAMS, CTX))
    result["digest_gpu_s"] = round(time.perf_counter() - began, 2)
    began = time.perf_counter()
    result["digest_cpu"] = digest(TorchContext(TorchModel(weights, "cpu"), STREAMS, CTX))
    result["digest_cpu_s"] = round(time.perf_counter() - began, 2)
    result["expect"] = args.expect
    began = time.perf_counter()
    try:
        result["digest_gpu_graph"] = digest(TorchContext(gpu, STREAMS, CTX), graph=True)
    except Exception as exc:  # report, and measure the rest
        result["digest_gpu_graph"] = f"failed: {type(exc).__name__}: {exc}"[:400]
    result["digest_gpu_graph_s"] = round(time.perf_counter() - began, 2)
    result["gpu_equals_cpu"] = result["digest_gpu"] == result["digest_cpu"] == result["digest_gpu_graph"]
    result["gpu_equals_expect"] = args.expect is None or result["digest_gpu"] == args.expect
    print(json.dumps(result), flush=True)
    # batch invariance
    alone, crowd = TorchContext(gpu, 1, 64), TorchContext(gpu, 300, 64)
    same = True
    for step in range(8):
        batch = tokens_for(step, 300)
        a = alone.step(batch[:1], np.full(1, step))
        b = crowd.step(batch, np.full(300, step))
        same = same and np.array_equal(a[0], b[0])
    result["batch_invariant"] = bool(same)
    print(json.dumps({"batch_invariant": result["batch_invariant"]}), flush=True)
    rates = []

    def measure(n: int, mode: str, start: int = 0) -> None:
        try:
            context = TorchContext(gpu, n, 1024)
            run = context.step_graph if mode == "graph" else context.step_tensor
            run(tokens_for(0, n), np.full(n, start))  # (captures the graph)
            torch.cuda.synchronize()
            began = time.perf_counter()
            for step in range(args.steps):
                run(tokens_for(step, n), np.full(n, start + 1 + step))
            torch.cuda.synchronize()
            seconds = time.perf_counter() - began
            row = {"streams": n, "mode": mode, "positions": "whole window" if mode == "graph" else f"{start + 1}-{start + args.steps}",
                   "tok_s": round(n * args.steps / seconds), "ms_per_step": round(1000 * seconds / args.steps, 1),
                   "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        except torch.cuda.OutOfMemoryError:
            row = {"streams": n, "mode": mode, "error": "out of memory"}
        except Exception as exc:
            row = {"streams": n, "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:400]}
        rates.append(row)
        print(json.dumps(row), flush=True)
        context = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    for n in map(int, filter(None, args.eager_streams.split(","))):
        for start in (0, 896):
            measure(n, "eager", start)
    for n in map(int, filter(None, args.streams.split(","))):
        measure(n, "graph")
    result["rates"] = rates
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    if not (result["gpu_equals_cpu"] and result["gpu_equals_expect"] and result["batch_invariant"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
