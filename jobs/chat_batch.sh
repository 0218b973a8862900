#!/usr/bin/env bash
# parsl-chat batch job: answer every prompt of a file using all nodes of this allocation.
#
#   sbatch jobs/chat_batch.sh PROMPTS [OUT_DIR]
#   sbatch -N4 --time=04:00:00 -p gpu -A myproject jobs/chat_batch.sh prompts.jsonl runs/big
#
# Arguments (or environment variables, exported to the job by sbatch):
#   PROMPTS             prompts file (JSONL or .txt)           PARSL_CHAT_PROMPTS
#   OUT_DIR             run directory (default runs/job-<id>)  PARSL_CHAT_OUT
#   PARSL_CHAT_CONFIG   agents/limits YAML (default: configs/agents.yaml)
#   PARSL_CHAT_ARGS     extra options for 'parsl-chat run', e.g. "--endpoint http://... --model m"
#   PARSL_CHAT_MAX_RESUBMIT  how many continuation jobs may follow (default 3; 0 disables)
#
# Walltime: SLURM sends SIGUSR1 300 s before the end (--signal below; for jobs shorter than
# ~10 minutes lower it on the command line, e.g. sbatch --signal=B:USR1@30 ...); parsl-chat also
# reads the job's time left from squeue and stops dispatching early on its own. Either
# way it records what finished and exits 3, and this script then submits a continuation
# job (--dependency=afterany) that resumes the same run directory, until the run is
# complete or PARSL_CHAT_MAX_RESUBMIT continuations have run. A continuation asks for the
# warning min(300 s, a quarter of its time limit) before the end: SLURM does not say which
# --signal this job was given, and the 300 s default would fire at once in a short job.
# (SLURM may send it up to 60 s early; in a job of a few minutes a continuation can stop early.)
#
#SBATCH --job-name=parsl-chat
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:30:00
#SBATCH --output=parsl-chat-%j.out
#SBATCH --signal=B:USR1@300

set -uo pipefail

prompts=${1:-${PARSL_CHAT_PROMPTS:-}}
out=${2:-${PARSL_CHAT_OUT:-}}
max_resubmit=${PARSL_CHAT_MAX_RESUBMIT:-3}
resubmitted=${PARSL_CHAT_RESUBMITTED:-0}
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2
script=${PARSL_CHAT_JOB_SCRIPT:-$SLURM_SUBMIT_DIR/jobs/chat_batch.sh}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "chat_batch.sh: submit me with sbatch (no SLURM job found)" >&2
  exit 2
fi
if [[ -z "$prompts" ]]; then
  echo "usage: sbatch jobs/chat_batch.sh PROMPTS [OUT_DIR]" >&2
  exit 2
fi
out=${out:-runs/job-$SLURM_JOB_ID}

args=(run --profile slurm-allocation)
if [[ -f "$out/run.json" ]]; then
  args+=(--resume "$out")           # a continuation: finish what the earlier job started
  [[ "$prompts" != "-" ]] && args+=("$prompts")
else
  args+=("$prompts" --out "$out")
fi
[[ -n "${PARSL_CHAT_CONFIG:-}" ]] && args+=(--config "$PARSL_CHAT_CONFIG")
# shellcheck disable=SC2206  # PARSL_CHAT_ARGS is a list of options, split on purpose
[[ -n "${PARSL_CHAT_ARGS:-}" ]] && args+=($PARSL_CHAT_ARGS)

echo "parsl-chat job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s): ${SLURM_JOB_NODELIST:-?}; run directory $out"

# Seconds in a SLURM time limit ([days-]hours:minutes:seconds, minutes:seconds, minutes).
limit_seconds() {
  local days=0 rest=$1 h=0 m=0 sec=0
  [[ $rest == *-* ]] && { days=${rest%%-*}; rest=${rest#*-}; }
  IFS=: read -r -a parts <<<"$rest"
  case ${#parts[@]} in
    3) h=${parts[0]} m=${parts[1]} sec=${parts[2]} ;;
    2) m=${parts[0]} sec=${parts[1]} ;;
    1) m=${parts[0]} ;;
  esac
  echo $(( ((10#$days * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$sec ))
}

# The warning signal a continuation asks for: 300 s before its end, or a quarter of a short limit.
warning_offset() {
  local limit
  [[ $1 =~ ^[0-9:-]+$ ]] || { echo 300; return; }  # UNLIMITED and the like
  limit=$(limit_seconds "$1")
  local quarter=$(( limit / 4 ))
  echo $(( quarter < 5 ? 5 : quarter > 300 ? 300 : quarter ))
}

# This job's log path with its job id turned back into %j, for the continuation.
# Only in the file name and only as a whole number: job 4's log in /tmp/pytest-14/
# must not become /tmp/pytest-1%j/ (seen in CI).
output_pattern() {
  local dir base
  dir=$(dirname -- "$1")
  base=$(basename -- "$1")
  base=$(sed -E "s/(^|[^0-9])$2([^0-9]|$)/\1%j\2/g" <<<"$base")
  printf '%s/%s\n' "$dir" "$base"
}

# The batch shell runs a trap only after its foreground child exits, so run
# parsl-chat in the background, forward the warning signal, and wait.
parsl-chat "${args[@]}" &
child=$!
trap 'echo "walltime warning: asking parsl-chat to stop cleanly"; kill -TERM "$child" 2>/dev/null' USR1 TERM
wait "$child"
rc=$?
while kill -0 "$child" 2>/dev/null; do  # wait returns early when a trapped signal arrives
  wait "$child"
  rc=$?
done

if [[ $rc == 3 ]]; then
  if (( resubmitted < max_resubmit )); then
    # the continuation asks for what this job had (options given to sbatch beat #SBATCH lines)
    info=$(scontrol show job "$SLURM_JOB_ID")
    field() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p" <<<"$info" | head -n1; }
    limit=$(field TimeLimit)
    same=(--nodes="$(field NumNodes | cut -d- -f1)" --time="$limit" --partition="$(field Partition)")
    same+=(--signal="B:USR1@$(warning_offset "$limit")")
    stdout=$(field StdOut)
    # append: a log name without the job id in it stays one log, not overwritten by the next job
    [[ -n "$stdout" ]] && same+=(--output="$(output_pattern "$stdout" "$SLURM_JOB_ID")" --open-mode=append)
    for opt in Account QOS; do
      value=$(field "$opt")
      [[ -n "$value" && "$value" != "(null)" ]] && same+=(--"${opt,,}"="$value")
    done
    next=$(PARSL_CHAT_RESUBMITTED=$((resubmitted + 1)) PARSL_CHAT_JOB_SCRIPT="$script" \
      sbatch --parsable "${same[@]}" --dependency="afterany:$SLURM_JOB_ID" "$script" "$prompts" "$out")
    echo "run not finished: continuation job $next submitted ($((resubmitted + 1)) of $max_resubmit)"
  else
    echo "run not finished and $max_resubmit continuation(s) used: resume by hand with"
    echo "  sbatch jobs/chat_batch.sh $prompts $out"
  fi
fi
exit $rc
