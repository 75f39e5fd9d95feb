#!/usr/bin/env bash
# Stop a Triad deployment started by triad_srun.sh: stop.sh RUN_DIR [TIMEOUT_S]
# Sends SIGTERM to the triad_srun.sh process recorded in RUN_DIR/triad_srun.pid (it then stops its
# own srun steps in order) and waits for it to exit. Run it on the host where triad_srun.sh runs
# (the salloc host, or the batch node for sbatch). From anywhere else use
#     scancel --signal=TERM --batch JOBID     (sbatch)   or   scancel JOBID   (ends the whole job)
set -euo pipefail
run_dir="${1:?usage: stop.sh RUN_DIR [TIMEOUT_S]}"
timeout_s="${2:-120}"
pid_file="$run_dir/triad_srun.pid"
[[ -f "$pid_file" ]] || { echo "stop.sh: no $pid_file: is a deployment running from $run_dir?" >&2; exit 1; }
pid=$(<"$pid_file")
kill -0 "$pid" 2>/dev/null || { echo "stop.sh: triad_srun.sh (pid $pid) is not running here" >&2; exit 1; }
kill -TERM "$pid"
for (( i = 0; i < timeout_s * 2; i++ )); do
    kill -0 "$pid" 2>/dev/null || { echo "stop.sh: stopped"; exit 0; }
    sleep 0.5
done
echo "stop.sh: triad_srun.sh (pid $pid) still running after ${timeout_s}s" >&2
exit 1
