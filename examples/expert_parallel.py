"""Expert parallelism: a SparseMoE layer's experts sharded over the processes of a torchrun job.

    torchrun --nproc-per-node 2 examples/expert_parallel.py [--steps 20]

gloo on CPU, NCCL when every process has a GPU. Each rank keeps E / W experts and its own batch of tokens; token rows
travel to their experts' ranks by all-to-all and back. The script checks the sharded layer against the whole layer
on this rank's tokens, then trains both data-parallel for a few steps (the replicated router's gradients averaged,
the experts' gradients already summing every rank's tokens) and prints the losses side by side.
"""
import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist

import moe_kernels
from moe_kernels import distributed as ep


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank and step")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if cuda else "cpu"

    torch.manual_seed(0)                                   # the same layer on every rank
    whole = moe_kernels.SparseMoE(64, 128, 4 * world, top_k=2, device=device)
    sharded = ep.expert_parallel(copy.deepcopy(whole))    # rank r keeps experts 4r .. 4r+3
    target = torch.nn.Linear(64, 64, device=device).requires_grad_(False)

    torch.manual_seed(1 + rank)                            # each rank its own tokens
    x = torch.randn(args.tokens, 64, device=device)
    err = (sharded(x) - whole(x)).abs().max().reshape(1)
    errs = [torch.empty_like(err) for _ in range(world)]
    dist.all_gather(errs, err)
    if rank == 0:
        for r, e in enumerate(errs):
            print(f"rank {r}/{world}: {sharded.experts.num_experts} of {sharded.num_experts} experts; "
                  f"max |sharded - whole| on this rank's tokens: {e.item():.2e}")

    # data-parallel training: the whole layer sees every rank's tokens (all-gathered), the sharded one only its own
    opt_w = torch.optim.SGD(whole.parameters(), lr=0.1)
    opt_s = torch.optim.SGD(sharded.parameters(), lr=0.1)
    for step in range(args.steps):
        x = torch.randn(args.tokens, 64, device=device)
        everyone = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(everyone, x)
        batch = torch.cat(everyone)
        loss_w = (whole(batch) - target(batch)).pow(2).mean()
        opt_w.zero_grad()
        loss_w.backward()
        opt_w.step()

        loss_s = (sharded(x) - target(x)).pow(2).mean() / world    # the global mean, split over the ranks
        opt_s.zero_grad()
        loss_s.backward()
        ep.all_reduce_replicated_grads(sharded, average=False)     # sum: the 1/W is in the loss
        opt_s.step()
        total = loss_s.detach().clone()
        dist.all_reduce(total)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss whole {loss_w.item():.6f}  sharded {total.item():.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's worker threads can still be releasing the last collective's tensors; releasing one that Python has
    # already let go of takes the GIL, which no thread gets once the interpreter is shutting down, and the process
    # aborts (pytorch/pytorch#190489). Leave without the interpreter's teardown, as a forked multiprocessing child
    # does.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
