"""What the two peers share with each other and with bpworker's defaults: the data, the schedule, the report."""
import argparse, gzip, json, math, time
import numpy as np

FASHION = "/usr/share/datasets/fashion-mnist"


def arguments():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", default="512,256", help="hidden widths")
    p.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate for the global batch")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--steps", type=int, default=0, help="throughput mode: stop after this many steps, no evaluation")
    p.add_argument("--target", type=float, default=0.0, help="stop at the first epoch reaching this test accuracy")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cnn", action="store_true", help="configs/fashion-cnn.yaml's network instead of an MLP")
    p.add_argument("--modules", default="", help="the network a bpworker model file records (images, 1x28x28)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--sync-bn", action="store_true", help="with --cnn or --modules: synchronized batch norm")
    p.add_argument("--fast", action="store_true",
                   help="PyTorch's fastest CPU setting for convolutions: channels_last memory format and torch.compile")
    return p.parse_args()


def load(split):
    images = np.frombuffer(gzip.open(f"{FASHION}/{split}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(f"{FASHION}/{split}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return images.reshape(-1, 784), labels.astype(np.int64)


def data():
    """Training and test set standardised with the training set's mean and std, as float32."""
    xtr, ytr = load("train")
    xte, yte = load("t10k")
    mean, std = (xtr / 255.0).mean(), (xtr / 255.0).std()
    norm = lambda x: ((x / 255.0 - mean) / std).astype(np.float32)
    return norm(xtr), ytr, norm(xte), yte


def learning_rate(args, step, total):
    """Linear warmup, then cosine to 0: bpworker's default schedule."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, max(0.0, (step - args.warmup) / max(1, total - args.warmup)))
    return args.lr * (1 + math.cos(math.pi * progress)) / 2


def shard(n, rank, size, batch, epoch, seed):
    """DistributedSampler's semantics: one permutation per epoch, rank r takes every size-th, remainder dropped."""
    perm = np.random.default_rng(seed + epoch).permutation(n)
    steps = n // (batch * size)
    return perm[rank:steps * batch * size:size], steps


class Report:
    """One JSON line per event on rank 0's stdout: throughput and per-epoch test accuracy with wall time."""

    def __init__(self, rank):
        self.rank, self.start = rank, time.time()

    def emit(self, **record):
        if self.rank == 0:
            print(json.dumps({**record, "elapsed_seconds": time.time() - self.start}), flush=True)


def network_from_model_file(path):
    """The nn.Sequential a bpworker model file records in its `modules` metadata, built as docs/model-files.md's
    loader builds it (one module of its own, Residual); the parameters stay PyTorch's initialisation."""
    import torch
    from safetensors import safe_open

    class Residual(torch.nn.Module):
        def __init__(self, body, shortcut=None):
            super().__init__()
            self.body, self.shortcut = body, shortcut if shortcut is not None else torch.nn.Identity()

        def forward(self, x):
            return self.body(x) + self.shortcut(x)

    def build(module):
        value = lambda v: build(v) if isinstance(v, dict) else [value(a) for a in v] if isinstance(v, list) else v
        kind = {"Residual": Residual}.get(module["module"]) or getattr(torch.nn, module["module"])
        return kind(*map(value, module["args"]), **{k: value(v) for k, v in module["kwargs"].items()})

    with safe_open(path, "pt") as f:
        modules = json.loads(f.metadata()["modules"])
    return torch.nn.Sequential(*map(build, modules))
