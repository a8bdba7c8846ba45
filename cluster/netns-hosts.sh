# Test hosts made of Linux network namespaces, shared by cluster/test-multihost and cluster/chaos (sourced, not run).
# Two hosts, h1 (10.77.0.11) and h2 (10.77.0.12), each a namespace with its own address on a private bridge that
# lives in a third namespace, so the machine's own network is never touched; mpirun reaches them through
# cluster/netns-agent (--mca plm_rsh_agent) instead of ssh. Usage, from the repository root:
#   . cluster/netns-hosts.sh
#   netns_init TAG            # TAG prefixes every message; exits 0 with "TAG: SKIPPED: ..." where not permitted
#   trap 'netns_teardown; rm -rf "$WORK"' EXIT
#   netns_up SLOTS HOSTFILE   # the bridge and hosts, BPW_NETNS_MAP, a hostfile of both addresses
#   on_h1 COMMAND ARGS...     # runs a command on host 1, where mpirun starts
# Port K of the bridge (portK in $BRIDGE_NS) is host K+1's link: `ip -n "$BRIDGE_NS" link set port1 down` cuts h2 off.
NETNS_HOSTS=(h1 h2)
NETNS_ADDRESSES=(10.77.0.11 10.77.0.12)
NETNS_SUBNET=10.77.0.0/24
AGENT=$(realpath cluster/netns-agent)

netns_init() {
  NETNS_TAG=$1
  PREFIX="bpw$$"
  BRIDGE_NS="$PREFIX-br"
  if [ "$(id -u)" -ne 0 ] || ! ip netns add "$PREFIX-probe" 2>/dev/null; then
    echo "$NETNS_TAG: SKIPPED: creating network namespaces is not permitted here (needs root and CAP_SYS_ADMIN)"
    exit 0
  fi
  ip netns del "$PREFIX-probe"
}

netns_names() { echo "$BRIDGE_NS"; for h in "${NETNS_HOSTS[@]}"; do echo "$PREFIX-$h"; done; }

# Kills whatever still runs in the test hosts (mpirun, orted, ranks) and removes the namespaces.
netns_teardown() {
  local ns pids
  for ns in $(netns_names); do
    pids=$(ip netns pids "$ns" 2>/dev/null)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  done
  sleep 0.2
  for ns in $(netns_names); do ip netns del "$ns" 2>/dev/null; done
}

# The network: a bridge in its own namespace, one veth pair per host; every host gets SLOTS slots in HOSTFILE.
netns_up() {
  local slots=$1 hostfile=$2 i ns map=""
  ip netns add "$BRIDGE_NS"
  ip -n "$BRIDGE_NS" link add br0 type bridge
  ip -n "$BRIDGE_NS" link set br0 up
  for i in "${!NETNS_HOSTS[@]}"; do
    ns="$PREFIX-${NETNS_HOSTS[$i]}"
    ip netns add "$ns"
    ip -n "$ns" link add eth0 type veth peer name "port$i" netns "$BRIDGE_NS"
    ip -n "$BRIDGE_NS" link set "port$i" master br0 up
    ip -n "$ns" addr add "${NETNS_ADDRESSES[$i]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    map="$map ${NETNS_HOSTS[$i]}=${NETNS_ADDRESSES[$i]}=$ns"
  done
  export BPW_NETNS_MAP="$map"
  printf "%s slots=$slots\n" "${NETNS_ADDRESSES[@]}" > "$hostfile"
}

# Runs a command on host 1, where mpirun starts.
on_h1() { "$AGENT" h1 "$(printf '%q ' "$@")"; }

# A small 3-class data set of 12 features as IDX files in DIR (train-x.idx, train-y.idx, test-x.idx, test-y.idx),
# and the training arguments that use it, in the array NETNS_JOB.
netns_small_job() {
  python3 - "$1" <<'PY'
import struct, sys, numpy as np
rng = np.random.default_rng(1)
y = rng.integers(0, 3, 400)
x = rng.integers(0, 128, (400, 12)) + 127 * (np.arange(12)[None, :] % 3 == y[:, None])
def idx(path, a):
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape) + a.astype(np.uint8).tobytes())
for split in ("train", "test"):
    idx(f"{sys.argv[1]}/{split}-x.idx", x); idx(f"{sys.argv[1]}/{split}-y.idx", y)
PY
  NETNS_JOB=(--progress plain --set "data.train_features=$1/train-x.idx" --set "data.train_labels=$1/train-y.idx"
     --set "data.test_features=$1/test-x.idx" --set "data.test_labels=$1/test-y.idx" --set data.normalize=scale
     --set "model.hidden=[32, 32]" --set training.batch_size=8 --set seed=3 --set logging.interval=5
     --set training.bucket_kib=1 --set schedule.warmup_steps=0)
}

# Compares two safetensors files tensor by tensor; prints the largest relative difference and whether every tensor
# is bitwise equal; fails when the names differ or a difference exceeds 1e-6.
same_parameters() {
  python3 - "$1" "$2" <<'PY'
import sys, numpy as np
from safetensors.numpy import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
worst = max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-12)) for k in a) if a.keys() == b.keys() else float("inf")
print(f"max relative difference {worst:.2e}, bitwise {'equal' if a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) else 'different'}")
sys.exit(0 if a.keys() == b.keys() and worst <= 1e-6 else 1)
PY
}
