"""Test scenarios on W gloo processes started here (127.0.0.1, a free port, a bounded wait).

`run_scenarios` starts the processes once and runs every scenario on each (one start-up for many tests); each
scenario's outcome on every rank ("ok", "skip: why", or the rank's traceback) is written to a file, so that
`check_scenario` fails the test of that scenario with the ranks' tracebacks, and a hang or a crashed process shows up
as the results it left missing, with the reason.
"""
import datetime
import os
import random
import socket
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, W, port, seed, out_dir, scenarios, timeout_s):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=timeout_s // 2))
    group = dist.group.WORLD
    try:
        for name, fn in scenarios.items():
            torch.manual_seed(seed)     # the same on every rank; torch.initial_seed() gives it back
            try:
                fn(rank, W, group)
                result = "ok"
            except pytest.skip.Exception as exc:
                result = f"skip: {exc}"
            except BaseException:
                result = f"rank {rank}:\n{traceback.format_exc()}"
            with open(os.path.join(out_dir, f"{name}.{rank}"), "w") as f:
                f.write(result)
            dist.barrier(group)
    finally:
        dist.destroy_process_group()
    # as examples/expert_parallel.py ends: gloo's worker threads may still hold the last collective's tensors, and
    # the interpreter's teardown would then abort the process (pytorch/pytorch#190489); the results are on disk
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_scenarios(scenarios: dict, W: int, timeout_s: int) -> dict:
    """{name: fn(rank, W, group)} run in order on W spawned gloo processes -> {name: [the outcome on each rank]}.
    Each scenario starts from torch.manual_seed(seed), the same seed on every rank: MOE_KERNELS_TEST_SEED, or a fresh
    one each run (printed). Skips when torch.distributed or gloo is unavailable."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    seed = int(os.environ.get("MOE_KERNELS_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"MOE_KERNELS_TEST_SEED={seed}")
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(W, _free_port(), seed, out_dir, scenarios, timeout_s), nprocs=W,
                                 join=False, start_method="spawn")
        deadline, missing = time.monotonic() + timeout_s, "no result"
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    missing = f"no result: the {W} processes were killed after {timeout_s} s"
                    break
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
            # a process died (a crash, not a failing scenario): its results stop there
            missing = f"no result: {exc}"
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        results = {}
        for name in scenarios:
            results[name] = []
            for r in range(W):
                path = os.path.join(out_dir, f"{name}.{r}")
                results[name].append(open(path).read() if os.path.exists(path) else f"rank {r}: {missing}")
    return results


def check_scenario(results: dict, scenario: str, W: int) -> None:
    """Skips if every rank skipped the scenario, fails with every rank's failure otherwise."""
    outcome = results[scenario]
    if all(r.startswith("skip") for r in outcome):
        pytest.skip(outcome[0])
    failed = [r for r in outcome if r != "ok"]
    assert not failed, f"{scenario} on {W} ranks:\n" + "\n".join(failed)
