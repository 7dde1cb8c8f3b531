# Sourced by the GPU scripts: run one stage of a GPU check under a time limit, log it to $OUT/LOG, record
# "NAME rc=.. seconds=.." in $STATUS and keep the first failure's code in FIRST_FAIL; a failing stage never
# stops the stages after it. Needs OUT, STATUS, FIRST_FAIL and T0 set by the caller.
stage() {  # stage NAME TIMEOUT_S LOG -- command...
  local name="$1" limit="$2" logf="$3"
  shift 4
  local t=$(date +%s)
  echo "=== [$name] $(date -u +%H:%M:%S) (+$((t - T0)) s): $*" | tee -a "$OUT/$logf"
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$OUT/$logf"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc seconds=$(( $(date +%s) - t ))" | tee -a "$STATUS"
  if [ "$rc" -ne 0 ] && [ "$FIRST_FAIL" -eq 0 ]; then FIRST_FAIL=$rc; fi
  return 0
}
