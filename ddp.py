"""Training on several processes with torchrun (DistributedDataParallel), as the paper trained
on two GPUs: rank 0's decisions shared with all, BatchNorm over the global batch (--sync-bn),
and a check that the processes' weights agree."""
import torch
import torch.distributed as dist


def from_rank_0(world, outcome):
    """Rank 0's `outcome` on every rank (it decides about the run folder for all)."""
    if world.size == 1:
        return outcome
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GlooSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm over the global batch for CPU processes, where nn.SyncBatchNorm has no
    kernels: the batch mean and variance are all-reduced differentiably."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        x = x.float()
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = all_reduce(x.sum((0, 2, 3))) / count
        centered = x - mean[:, None, None]
        var = all_reduce(centered.square().sum((0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return centered * scale[:, None, None] + self.bias[:, None, None]


def sync_batchnorm(module, device):
    """Every BatchNorm2d of `module` normalised over all processes' batches (--sync-bn)."""
    if device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            synced = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced.to(device))
        else:
            sync_batchnorm(child, device)
    return module


def any_process(flag):
    """Whether `flag` is true in any process (a CPU all-reduce: gloo)."""
    total = torch.tensor([float(flag)], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() > 0


def ranks_agree(model):
    """Whether every process holds the same weights, as DDP should keep them, bit for bit."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    sums = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, checksum)
    return len({s.item() for s in sums}) == 1
