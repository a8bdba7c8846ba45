"""Data-parallel training with PyTorch DistributedDataParallel on the gloo backend, written the way its users
write it: nn.Sequential, DDP, a DistributedSampler, SGD with Nesterov momentum, LambdaLR. An MLP by default;
--cnn is configs/fashion-cnn.yaml's network (two conv-batchnorm-relu-maxpool blocks, then linear 128), with
batch norm per rank as in bpworker's `model.batchnorm: local` (DDP's default) or SyncBatchNorm with --sync-bn.
Rank and world size come from mpirun's environment.
    mpirun -n 2 python torch_ddp.py --hidden 1024,1024 --batch 256 --steps 60
    mpirun -n 2 python torch_ddp.py --cnn --batch 64 --steps 40
--modules FILE builds the network a bpworker model file records (its `modules` metadata, as the loader in
docs/model-files.md does, residual blocks included), so a ResNet config is compared with exactly its own network:
    mpirun -n 2 python torch_ddp.py --modules runs/resnet/model.safetensors --fast --batch 64 --steps 40
With --fast, the CNN runs in PyTorch's fastest CPU setting: channels_last tensors and torch.compile (inductor) of the
DDP module, its compile time left out of the measured steps (they start at step 10)."""
import os, sys, time
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
import common

args = common.arguments()
rank, size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29517")
dist.init_process_group("gloo", rank=rank, world_size=size)
torch.set_num_threads(1)
torch.manual_seed(args.seed)

xtr, ytr, xte, yte = (torch.from_numpy(a) for a in common.data())
images = args.cnn or args.modules
if args.modules:
    network = common.network_from_model_file(args.modules)
    xtr, xte = xtr.reshape(-1, 1, 28, 28), xte.reshape(-1, 1, 28, 28)
    if args.sync_bn:
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
elif args.cnn:
    nn = torch.nn
    xtr, xte = xtr.reshape(-1, 1, 28, 28), xte.reshape(-1, 1, 28, 28)
    network = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))
    if args.sync_bn:
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
else:
    widths = [784] + [int(w) for w in args.hidden.split(",")] + [10]
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i + 2 < len(widths):
            layers.append(torch.nn.ReLU())
    network = torch.nn.Sequential(*layers)
memory_format = torch.channels_last if args.fast and images else torch.contiguous_format
network = network.to(memory_format=memory_format)
model = torch.nn.parallel.DistributedDataParallel(network)
if args.fast:
    model = torch.compile(model)
sampler = DistributedSampler(TensorDataset(xtr, ytr), num_replicas=size, rank=rank, seed=args.seed, drop_last=True)
loader = DataLoader(TensorDataset(xtr, ytr), batch_size=args.batch, sampler=sampler, drop_last=True)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
total = len(loader) * args.epochs
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: common.learning_rate(args, s, total) / args.lr)
loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)


def evaluate():
    model.eval()
    with torch.no_grad():
        mine = torch.arange(rank, len(xte), size)
        correct = torch.tensor([(network(xte[mine]).argmax(1) == yte[mine]).sum().item()])
    dist.all_reduce(correct)
    model.train()
    return correct.item() / len(xte)


report = common.Report(rank)
step = 0
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    t0, n0 = time.time(), 0
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x.contiguous(memory_format=memory_format)), y).backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if step == 10:
            t0, n0 = time.time(), step
        if args.steps and step >= args.steps:
            report.emit(samples_per_second=(step - n0) * args.batch * size / (time.time() - t0))
            break
    if args.steps and step >= args.steps:
        break
    accuracy = evaluate()
    report.emit(epoch=epoch + 1, test_accuracy=accuracy)
    if args.target and accuracy >= args.target:
        break
dist.barrier()
# Every result is printed. Tearing gloo down at interpreter exit aborted a rank now and then under bench/run
# ("terminate called without an active exception": a worker thread still joinable), so leave without it.
sys.stdout.flush()
os._exit(0)
