"""The GEMMs of one 784-1024-1024-10 training step at batch 256, through NumPy (its own OpenBLAS), alone: the
BLAS floor under numpy_mpi4py.py, to set beside bpbench's floor under bpworker (table 1).
    OPENBLAS_NUM_THREADS=1 python numpy_gemms.py"""
import json, time
import numpy as np

rng = np.random.default_rng(0)
batch, widths = 256, [784, 1024, 1024, 10]
layers = []
for i, o in zip(widths[:-1], widths[1:]):
    layers.append((rng.standard_normal((batch, i), dtype=np.float32), rng.standard_normal((o, i), dtype=np.float32),
                   rng.standard_normal((batch, o), dtype=np.float32)))


def step():
    for l, (x, w, dy) in enumerate(layers):
        x @ w.T          # forward
        dy.T @ x         # weight gradient
        if l > 0:
            dy @ w       # input gradient (not for the first layer)


step()
times = []
for _ in range(15):
    t = time.perf_counter()
    for _ in range(5):
        step()
    times.append((time.perf_counter() - t) / 5)
print(json.dumps({"gemm_ms": sorted(times)[len(times) // 2] * 1e3, "numpy": np.__version__}))
