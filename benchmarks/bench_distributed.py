"""Expert parallelism: one SparseMoE layer with its experts sharded over W processes, against the same layer whole
in one process.

    python -m benchmarks.bench_distributed [--world 2] [--device cpu|cuda] [--tokens 2048] [--dim 512]
        [--hidden 256] [--experts 64] [--top-k 8] [--repeats 7]
    torchrun --nproc-per-node 2 -m benchmarks.bench_distributed ...   (the same, started by torchrun)

gloo on CPU, NCCL on GPUs (one per process). Each rank routes its own --tokens tokens. Reported per rank: medians
of --repeats timed forwards after a warm-up, each phase between barriers (routing; the exchange plan: sort, counts
all-to-all, the one host sync; dispatch: gather and all-to-all; expert compute; return all-to-all; combine), then
the layer's whole forward and forward+backward. Tokens/s of the group (and per process) are compared with the
same layer whole in one process: on CPU with the threads of all W processes (the machine's throughput), on GPUs
one GPU. Bytes: each routed row crosses once each way, counted from the split sizes. Writes
benchmarks/results/distributed-<device>-<date>.json and .md.
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_kernels import SparseMoE
from moe_kernels import distributed as ep

from . import common

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PHASES = ("route", "plan", "dispatch a2a", "experts", "return a2a", "combine")


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="processes to start (ignored under torchrun)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=RESULTS)
    return p.parse_args(argv)


def _sync(device):
    common.synchronize(device)


def _timed(fn, device, group):
    """(result, seconds) of fn between barriers: every rank starts together, the slowest sets the time."""
    dist.barrier(group)
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    dist.barrier(group)
    return out, time.perf_counter() - t


def _phases(layer, x, device, group):
    """One forward of the sharded layer, phase by phase, -> ({phase: seconds}, bytes sent, bytes received)."""
    t = {}
    r, t["route"] = _timed(lambda: layer.route(x), device, group)
    p, t["plan"] = _timed(lambda: ep.plan(r.experts, layer.experts.num_experts, group), device, group)
    got, t["dispatch a2a"] = _timed(lambda: ep.dispatch(x, p, group), device, group)
    y, t["experts"] = _timed(lambda: ep.local_experts(got, p, layer.experts.gate_up_proj, layer.experts.down_proj,
                                                      **layer.experts.kwargs()), device, group)
    back, t["return a2a"] = _timed(lambda: ep.exchange(y, p.recv, p.send, group), device, group)
    _, t["combine"] = _timed(lambda: ep.combine(back, p, r.weights), device, group)
    size = x.element_size() * x.shape[1]
    return t, sum(p.send) * size, sum(p.recv) * size


def _worker(rank, world, port, args):
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device == "cuda" else "gloo"
    if torchrun:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    torch.manual_seed(0)
    layer = SparseMoE(args.dim, args.hidden, args.experts, args.top_k, aux_loss_coef=0.0, device=device, dtype=dtype)
    ep.expert_parallel(layer, group)
    torch.manual_seed(1 + rank)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)

    def fwd():
        return layer(x)

    def fwd_bwd():
        layer(x.requires_grad_()).sum().backward()

    phase_runs, totals = [], {"forward": [], "forward+backward": []}
    for i in range(args.repeats + 1):          # the first of each is the warm-up
        t, sent, received = _phases(layer, x, device, group)
        _, f = _timed(fwd, device, group)
        _, fb = _timed(fwd_bwd, device, group)
        if i:
            phase_runs.append(t)
            totals["forward"].append(f)
            totals["forward+backward"].append(fb)
    row = {"rank": rank, "tokens": args.tokens, "bytes_sent": sent, "bytes_received": received,
           "phases_s": {ph: statistics.median(r[ph] for r in phase_runs) for ph in PHASES},
           **{f"{k}_s": statistics.median(v) for k, v in totals.items()}}
    rows = [None] * world
    dist.all_gather_object(rows, row, group=group)
    dist.destroy_process_group()
    if rank == 0:
        single = _single_process(args, dtype, world)
        _report(args, dtype, world, rows, single)
    # as examples/expert_parallel.py ends (torchrun and spawned processes alike): gloo's worker threads may still
    # hold the last collective's tensors, and the interpreter's teardown would then abort (pytorch/pytorch#190489)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _single_process(args, dtype, world):
    """The whole layer in one process on rank 0's tokens: forward and forward+backward medians."""
    device = args.device
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) * world)
    torch.manual_seed(0)
    layer = SparseMoE(args.dim, args.hidden, args.experts, args.top_k, aux_loss_coef=0.0, device=device, dtype=dtype)
    torch.manual_seed(1)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    out = {}
    for name, fn in (("forward", lambda: layer(x)), ("forward+backward", lambda: layer(x.requires_grad_()).sum()
                                                     .backward())):
        times = []
        for i in range(args.repeats + 1):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if i:
                times.append(time.perf_counter() - t)
        out[f"{name}_s"] = statistics.median(times)
    return out


def _report(args, dtype, world, rows, single):
    elem = torch.finfo(dtype).bits // 8
    routed_bytes = args.tokens * args.top_k * args.dim * elem
    shape = f"T{args.tokens}/rank-D{args.dim}-H{args.hidden}-E{args.experts}-k{args.top_k}"
    lines = [f"# Expert parallelism: {shape}, {world} processes, {'gloo' if args.device == 'cpu' else 'NCCL'}, "
             f"{str(dtype).replace('torch.', '')}", "",
             f"Machine: {common.device_name(args.device)}; {datetime.date.today().isoformat()}; "
             f"medians of {args.repeats} after a warm-up, phases between barriers.", "",
             "| rank | " + " | ".join(PHASES) + " | forward | fwd+bwd | tokens/s fwd | MiB sent | MiB received |",
             "|" + "---|" * (len(PHASES) + 6)]
    for r in rows:
        ph = r["phases_s"]
        lines.append(f"| {r['rank']} | " + " | ".join(f"{1e3 * ph[p]:.1f} ms" for p in PHASES) +
                     f" | {1e3 * r['forward_s']:.1f} ms | {1e3 * r['forward+backward_s']:.1f} ms | "
                     f"{r['tokens'] / r['forward_s']:.0f} | {r['bytes_sent'] / 2**20:.2f} | "
                     f"{r['bytes_received'] / 2**20:.2f} |")
    fwd = max(r["forward_s"] for r in rows)              # the group's step ends with its slowest rank
    fb = max(r["forward+backward_s"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    a2a = statistics.median((r["phases_s"]["dispatch a2a"] + r["phases_s"]["return a2a"]) / sum(r["phases_s"].values())
                            for r in rows)
    lines += ["", f"One process, the whole layer, {args.tokens} tokens"
              f"{' on all the CPUs of the W processes' if args.device == 'cpu' else ' on one GPU'}: forward "
              f"{1e3 * single['forward_s']:.1f} ms, forward+backward {1e3 * single['forward+backward_s']:.1f} ms.",
              f"Tokens/s of the whole group (every rank's tokens over the slowest rank's time) vs that one process: "
              f"forward {tokens / fwd:.0f} vs {args.tokens / single['forward_s']:.0f} "
              f"({tokens / fwd * single['forward_s'] / args.tokens:.2f}x), forward+backward {tokens / fb:.0f} vs "
              f"{args.tokens / single['forward+backward_s']:.0f} "
              f"({tokens / fb * single['forward+backward_s'] / args.tokens:.2f}x); per process: forward "
              f"{tokens / fwd / world:.0f}, forward+backward {tokens / fb / world:.0f}.",
              f"The two all-to-alls take {100 * a2a:.0f}% of the forward's phases (median over ranks).",
              f"Rows each way: each rank sends T*k*D*{elem} B = {routed_bytes / 2**20:.2f} MiB when every routed row "
              f"crosses once (its own experts' rows included: all_to_all_single copies those locally)."]
    text = "\n".join(lines) + "\n"
    print(text)
    stem = os.path.join(args.out, f"distributed-{args.device}-{datetime.date.today().isoformat()}")
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump({"shape": shape, "world": world, "dtype": str(dtype), "machine": common.machine(args.device),
                   "ranks": rows, "single_process": single, "routed_bytes_per_rank": routed_bytes}, f, indent=1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    args = parse(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, args)
    else:
        mp.start_processes(_worker, args=(args.world, _free_port(), args), nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
