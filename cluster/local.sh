#!/usr/bin/env bash
# Simulate a multi-node Ray cluster on this machine (default 2 nodes of 1 CPU), reachable on
# 127.0.0.1 only and with token authentication, then run a celli-scale command on it.
#
#   cluster/local.sh --check                          start, show the nodes, check listeners, stop
#   cluster/local.sh celli-scale train run.yaml       runs: celli-scale train run.yaml
#                                                         --ray-address 127.0.0.1:PORT --num-workers 2
#   cluster/local.sh --nodes 3 --cpus 2 CMD ...       other sizes
#
# The cluster is Ray's own multi-node simulator (ray.cluster_utils.Cluster), started by
# celli_scale.distributed.ray_launcher.local_main with RAY_AUTH_MODE=token, a fresh random
# token and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps every node on 127.0.0.1 (on
# Linux Ray otherwise registers nodes at the machine's outward address and listens on all
# interfaces). The TCP listeners opened while it runs are sampled every second; one off
# loopback fails the run. Only the processes it started are stopped (no `ray stop`, which
# would stop every Ray instance of this user on the machine).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=python3
[[ -x $repo/.venv/bin/python ]] && py=$repo/.venv/bin/python
# The command (e.g. celli-scale) from the checkout's environment when it is not on PATH.
[[ -d $repo/.venv/bin ]] && PATH=$PATH:$repo/.venv/bin
"$py" -c 'import ray' 2>/dev/null || {
    echo "local.sh: ray is not installed (pip install -e '.[cluster]')" >&2
    exit 1
}
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
exec "$py" -m celli_scale.distributed.ray_launcher "$@"
