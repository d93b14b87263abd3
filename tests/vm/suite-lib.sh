# Sourced by tests/vm/*-suite.sh inside the guest: numbered, timed stages and the summary.
#
#   suite_init NAME ONLY      NAME prefixes every heading; ONLY is the suite's HOLDFAST_*_STAGES
#                             value: empty runs every stage (as CI does: scripts/test refuses
#                             the variables there), else a list of stage numbers to run alone
#                             (a local check of one stage)
#   stage N TITLE COMMAND...  runs COMMAND as stage N unless ONLY leaves it out; every stage
#                             runs even when an earlier one failed, each timed
#   suite_wanted N            whether stage N runs (for a stage that is prepared before it runs)
#   suite_summary             prints each stage's outcome and time, and what ONLY left out
#   suite_end                 exits 1 naming the failed stages (and the failures the suite
#                             added to `failed` itself, such as volumes left behind), else 0

suite_init() {
  suite_name=$1
  suite_only=$2
  suite_start=$SECONDS
  suite_skipped=()
  failed=()
  summary=()
}

suite_wanted() {
  [ -z "$suite_only" ] || [[ " $suite_only " == *" $1 "* ]]
}

stage() {
  local n=$1 name=$2 t=$SECONDS rc=0
  shift 2
  if ! suite_wanted "$n"; then
    suite_skipped+=("$n")
    return 0
  fi
  echo
  echo "== $suite_name: $n. $name"
  # A subshell with errexit of its own: `cmd || rc=$?` would switch errexit off inside
  # functions, and a failed step of a shell function run as a stage would go unseen.
  set +e
  (set -e; "$@")
  rc=$?
  set -e
  summary+=("$(printf '%-54s %s in %ss' "$n. $name" "$([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)")" $((SECONDS - t)))")
  [ $rc = 0 ] || failed+=("$n. $name")
}

suite_summary() {
  echo
  echo "== $suite_name summary ($((SECONDS - suite_start))s in the guest)"
  printf '   %s\n' "${summary[@]}"
  # Sorted and unique: a stage number given to `stage` several times (one per test binary).
  [ ${#suite_skipped[@]} = 0 ] ||
    echo "   NOT RUN (only stages \"$suite_only\" were asked for): stages $(printf '%s\n' "${suite_skipped[@]}" | sort -nu | tr '\n' ' ')"
}

suite_end() {
  if [ ${#failed[@]} -gt 0 ]; then
    echo "$suite_name: FAILED: ${failed[*]}"
    exit 1
  fi
  if [ ${#suite_skipped[@]} -gt 0 ]; then
    echo "$suite_name: the stages asked for passed (a partial run: not every stage ran)"
  else
    echo "$suite_name: all stages passed"
  fi
}
