"""One rank of tests/test_distributed_norm.py: launched by torch.distributed.run (gloo, CPU).

Every rank builds the same seeded batch and takes its shard of it (unequal shard sizes and
unequal unmasked counts); RepBN and PRepBN (gamma strictly inside (0, 1), and 0 after the
schedule) train under DistributedDataParallel with synchronized statistics for two steps, and
rank 0 compares the gathered outputs, input gradients, parameter gradients (DDP's average
times the world size: the gradient of the summed loss) and every rank's running statistics
with one process, sync_stats=False, on the concatenated batch. Exits 1 on any mismatch.
"""
import copy
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from leanformer.nn import PRepBN, RepBN
from leanformer.ops import rep_batchnorm

C = 12
T = 7
SHARDS = [2, 3]  # sequences per rank: the ranks hold unequal batches
RTOL, ATOL = 1e-5, 1e-5


def batch(step, mask_kind):
    """The full batch of one step, identical on every rank: x, mask, the loss weights."""
    g = torch.Generator().manual_seed(1000 + step)
    B = sum(SHARDS)
    x = torch.randn(B, T, C, generator=g) * 2 + 3  # |mean| > std, as after a residual stream
    w = torch.randn(B, T, C, generator=g)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "padding":  # unequal unmasked counts per rank
        lengths = torch.tensor([7, 3, 5, 1, 6])
        mask = torch.arange(T)[None, :] < lengths[:, None]
    else:  # "rank0_empty": rank 0 contributes no token to the statistics
        mask = torch.rand(B, T, generator=g) > 0.4
        mask[: SHARDS[0]] = False
    return x, mask, w


def make(kind, group):
    torch.manual_seed(7)
    if kind == "repbn":
        m = RepBN(C, process_group=group)
    else:
        m = PRepBN(C, total_steps=10, warmup_steps=1, process_group=group)
        # gamma 0.8 at the first step, 0.7 at the second; gamma0: past the schedule, 0 and 0
        m.step.fill_(3 if kind == "prepbn" else 11)
        with torch.no_grad():
            m.ln.weight.copy_(torch.rand(C) + 0.5)
            m.ln.bias.copy_(torch.randn(C))
    bn = norm_of(m)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C) + 0.5)
        bn.bias.copy_(torch.randn(C))
        bn.alpha.fill_(0.4)
    return m


def norm_of(m):
    """The RepBN of a RepBN or PRepBN."""
    return m if isinstance(m, RepBN) else m.bn


def buffers(m):
    return torch.cat([norm_of(m).running_mean, norm_of(m).running_var])


def compare(name, got, want, failures):
    try:
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    except AssertionError as e:
        failures.append(f"{name}: {e}")


def run_case(kind, mask_kind, rank, world, group, failures):
    lo = sum(SHARDS[:rank])
    hi = lo + SHARDS[rank]
    dist_model = DDP(make(kind, group))
    ref = make(kind, None)
    norm_of(ref).sync_stats = False
    assert norm_of(dist_model.module).synchronized() and not norm_of(ref).synchronized()
    for step in range(2):
        x, mask, w = batch(step, mask_kind)
        # Distributed: this rank's shard.
        xs = x[lo:hi].clone().requires_grad_(True)
        ms = None if mask is None else mask[lo:hi]
        dist_model.zero_grad()
        y = dist_model(xs, ms)
        (y * w[lo:hi]).sum().backward()
        local = {"y": y.detach(), "dx": xs.grad,
                 "params": {n: p.grad * world for n, p in dist_model.module.named_parameters()},
                 "buffers": buffers(dist_model.module)}
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if rank != 0:
            continue
        # One process on the concatenated batch.
        xr = x.clone().requires_grad_(True)
        ref.zero_grad()
        yr = ref(xr, mask)
        (yr * w).sum().backward()
        where = f"{kind}, mask={mask_kind}, step {step}"
        compare(f"{where}: output", torch.cat([r["y"] for r in gathered]), yr.detach(), failures)
        compare(f"{where}: grad x", torch.cat([r["dx"] for r in gathered]), xr.grad, failures)
        for n, p in ref.named_parameters():
            compare(f"{where}: grad {n} (rank 0, DDP average x world)", gathered[0]["params"][n],
                    p.grad, failures)
        for r in range(world):
            compare(f"{where}: running statistics of rank {r}", gathered[r]["buffers"], buffers(ref),
                    failures)
    # A copy (fold_batchnorm's, an EMA's) shares the group and the folded model matches.
    if rank == 0 and group is not None:
        twin = copy.deepcopy(dist_model.module)
        if norm_of(twin).process_group is not group:
            failures.append(f"{kind}: deepcopy did not share the process group")
    # Eval: running statistics only, no collective.
    dist_model.eval()
    ref.eval()
    x, mask, _ = batch(2, mask_kind)
    with torch.no_grad():
        y = dist_model.module(x[lo:hi])
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(y, gathered, dst=0)
    if rank == 0:
        with torch.no_grad():
            compare(f"{kind}, mask={mask_kind}: eval output", torch.cat(gathered), ref(x), failures)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == len(SHARDS), f"run with --nproc_per_node={len(SHARDS)}"
    torch.set_num_threads(1)
    failures = []
    # The default group for RepBN, an explicit one (all ranks) for PRepBN.
    explicit = dist.new_group(list(range(world)))
    cases = 0
    for kind, group in (("repbn", None), ("prepbn", explicit), ("prepbn_gamma0", explicit)):
        for mask_kind in ("none", "padding", "rank0_empty"):
            run_case(kind, mask_kind, rank, world, group, failures)
            cases += 1
    # sync_stats=False: this rank's own statistics, as the op computes them on the shard.
    local = RepBN(C, sync_stats=False)
    x, mask, _ = batch(0, "padding")
    lo = sum(SHARDS[:rank])
    xs, ms = x[lo:lo + SHARDS[rank]], mask[lo:lo + SHARDS[rank]]
    rm, rv = torch.zeros(C), torch.ones(C)
    want = rep_batchnorm(xs, local.weight, local.bias, local.alpha, rm, rv, training=True, mask=ms)
    compare(f"rank {rank}: sync_stats=False output", local(xs, ms), want, failures)
    compare(f"rank {rank}: sync_stats=False running statistics", buffers(local), torch.cat([rm, rv]),
            failures)
    for f in failures:
        print(f"rank {rank} MISMATCH", f, flush=True)
    failed = torch.tensor([len(failures)])
    dist.all_reduce(failed)
    if rank == 0:
        print(f"rank 0: {cases} cases x 2 steps compared, {len(failures)} mismatches", flush=True)
    dist.destroy_process_group()
    return 1 if failed.item() else 0


if __name__ == "__main__":
    sys.exit(main())
