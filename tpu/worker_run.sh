#!/usr/bin/env bash
# Runs on each TPU worker, in the pbbjax checkout: starts, stops and reports this worker's training run.
#
#   bash tpu/worker_run.sh start [--workdir DIR] -- TRAIN_ARGS...  python -m pbbjax.train TRAIN_ARGS, detached
#   bash tpu/worker_run.sh status     prints "pbbjax-status HOST running|exited N|stopped|dead|absent"
#   bash tpu/worker_run.sh stop       SIGTERM to the run, SIGKILL after 30 s
#   bash tpu/worker_run.sh logs [--lines N] [--follow]
#
# Each worker keeps its own log, logs/worker-HOST.log, with .pid and .exit files beside it. With a gs://
# workdir the log and the exit status are also copied to WORKDIR/logs/ every PBB_SYNC_SECONDS (60) and at
# the end, so they outlive a preempted VM. "start" stops a run already going first. Environment:
# PBB_PYTHON (default .venv/bin/python); HF_HOME, PBBJAX_CACHE_DIR, JAX_COMPILATION_CACHE_DIR (default
# under ~/.cache).
set -euo pipefail

self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")/.."
host=$(hostname)
log_dir=logs
log=$log_dir/worker-$host.log
pid_file=$log_dir/worker-$host.pid
exit_file=$log_dir/worker-$host.exit
python=${PBB_PYTHON:-.venv/bin/python}

usage() {
  sed -n '4,7p' "$self" >&2
  exit 2
}

alive() {  # a process of the run's session is still there (not merely a reused pid after a reboot)
  [ -f "$pid_file" ] && pgrep -g "$(cat "$pid_file")" -f 'worker_run[.]sh|pbbjax[.]train' >/dev/null
}

sync_logs() {  # $1: the workdir; copies only to gs://
  case $1 in gs://*) ;; *) return 0 ;; esac
  local f
  for f in "$log" "$exit_file"; do
    if [ -f "$f" ]; then
      gcloud storage cp --quiet "$f" "${1%/}/logs/" >/dev/null 2>&1 || true
    fi
  done
}

run() {  # in its own session: train, copy the log now and then, record the exit status
  local workdir=$1 code=0 train syncer
  shift
  export HF_HOME=${HF_HOME:-$HOME/.cache/huggingface}
  export PBBJAX_CACHE_DIR=${PBBJAX_CACHE_DIR:-$HOME/.cache/pbbjax}
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jax}
  echo "=== $(date -u +%FT%TZ) $host:$(printf ' %q' "$python" -m pbbjax.train "$@")" >>"$log"
  "$python" -m pbbjax.train "$@" >>"$log" 2>&1 &
  train=$!
  (while kill -0 "$train" 2>/dev/null; do
    sleep "${PBB_SYNC_SECONDS:-60}"
    sync_logs "$workdir"
  done) &
  syncer=$!
  wait "$train" || code=$?
  kill "$syncer" 2>/dev/null || true
  echo "=== $(date -u +%FT%TZ) $host: exit status $code" >>"$log"
  echo "$code" >"$exit_file"
  sync_logs "$workdir"
}

start() {
  local workdir=""
  while [ $# -gt 0 ]; do
    case $1 in
      --workdir) workdir=$2; shift 2 ;;
      --) shift; break ;;
      *) usage ;;
    esac
  done
  stop >/dev/null
  mkdir -p "$log_dir"
  rm -f "$exit_file"
  nohup setsid bash "$self" _run "$workdir" "$@" >/dev/null 2>&1 </dev/null &
  echo $! >"$pid_file"
  echo "pbbjax-status $host started (pid $!, log $PWD/$log)"
}

stop() {
  if alive; then
    local group
    group=$(cat "$pid_file")
    kill -TERM -- "-$group" 2>/dev/null || true
    for _ in $(seq 30); do
      alive || break
      sleep 1
    done
    if alive; then kill -KILL -- "-$group" 2>/dev/null || true; fi
    echo stopped >"$exit_file"
  fi
  rm -f "$pid_file"
  status
}

status() {
  if alive; then
    echo "pbbjax-status $host running"
  elif [ -f "$exit_file" ] && [ "$(cat "$exit_file")" = stopped ]; then
    echo "pbbjax-status $host stopped"
  elif [ -f "$exit_file" ]; then
    echo "pbbjax-status $host exited $(cat "$exit_file")"
  elif [ -f "$pid_file" ]; then
    echo "pbbjax-status $host dead"  # gone without an exit status: the VM restarted, or a kill -9
  else
    echo "pbbjax-status $host absent"
  fi
}

logs() {
  local lines=50 follow=""
  while [ $# -gt 0 ]; do
    case $1 in
      --lines) lines=$2; shift 2 ;;
      --follow) follow=1; shift ;;
      *) usage ;;
    esac
  done
  if [ ! -f "$log" ]; then
    echo "no log yet on $host ($PWD/$log)"
  elif [ -n "$follow" ]; then
    exec tail -v -n "$lines" -F "$log"
  else
    tail -v -n "$lines" "$log"
  fi
}

[ $# -ge 1 ] || usage
command=$1
shift
case $command in
  start | stop | status | logs) "$command" "$@" ;;
  _run) run "$@" ;;
  *) usage ;;
esac
