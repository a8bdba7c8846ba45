"""Data-parallel MLP training in NumPy with mpi4py, written the way its users write it: forward and backward
by hand, one Allreduce per gradient array after backward, SGD with Nesterov momentum.
    mpirun -n 2 python numpy_mpi4py.py --hidden 1024,1024 --batch 256 --steps 60"""
import time
import numpy as np
from mpi4py import MPI
import common

args = common.arguments()
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
xtr, ytr, xte, yte = common.data()
widths = [784] + [int(w) for w in args.hidden.split(",")] + [10]

rng = np.random.default_rng(args.seed)
params = []
for i, o in zip(widths[:-1], widths[1:]):
    params += [(rng.standard_normal((o, i)) * np.sqrt(2 / i)).astype(np.float32), np.zeros(o, np.float32)]
for p in params:
    comm.Bcast(p, root=0)
momentum = [np.zeros_like(p) for p in params]


def forward(x):
    acts = [x]
    for l in range(0, len(params), 2):
        x = x @ params[l].T + params[l + 1]
        if l + 2 < len(params):
            x = np.maximum(x, 0)
        acts.append(x)
    return acts


def backward(acts, y):
    logits = acts[-1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
    d = p
    d[np.arange(len(y)), y] -= 1
    d /= len(y)
    grads = [None] * len(params)
    for l in range(len(params) - 2, -1, -2):
        x = acts[l // 2]
        grads[l] = d.T @ x
        grads[l + 1] = d.sum(0)
        if l > 0:
            d = (d @ params[l]) * (x > 0)
    return loss, grads


def evaluate():
    mine = np.arange(rank, len(xte), size)
    correct = np.array([int((forward(xte[mine])[-1].argmax(1) == yte[mine]).sum())])
    comm.Allreduce(MPI.IN_PLACE, correct)
    return correct[0] / len(xte)


report = common.Report(rank)
step, total = 0, None
for epoch in range(args.epochs):
    indices, steps = common.shard(len(xtr), rank, size, args.batch, epoch, args.seed)
    total = total or steps * args.epochs
    t0, n0 = time.time(), 0
    for s in range(steps):
        batch = indices[s * args.batch:(s + 1) * args.batch]
        loss, grads = backward(forward(xtr[batch]), ytr[batch])
        for g in grads:
            comm.Allreduce(MPI.IN_PLACE, g)
            g /= size
        lr = common.learning_rate(args, step, total)
        for p, g, m in zip(params, grads, momentum):
            g += 5e-4 * p
            m *= 0.9
            m += g
            p -= lr * (g + 0.9 * m)
        step += 1
        if step == 10:
            t0, n0 = time.time(), step
        if args.steps and step >= args.steps:
            report.emit(samples_per_second=(step - n0) * args.batch * size / (time.time() - t0))
            raise SystemExit
    accuracy = evaluate()
    report.emit(epoch=epoch + 1, test_accuracy=accuracy)
    if args.target and accuracy >= args.target:
        break
