# Sourced by tests/vm/*-suite.sh inside the guest: numbered, timed stages and the summary.
#
#   suite_init NAME ONLY      NAME prefixes every heading; ONLY is the suite's HOLDFAST_*_STAGES
#                             value: empty runs every stage; "N M" runs only stages N and M (a
#                             local check of one stage); "-N M" runs every stage but N and M
#                             (scripts/test runs a suite as "N" in one VM and "-N" in another,
#                             so that the two halves are the whole suite even when a stage is
#                             added; a user's HOLDFAST_*_STAGES is refused under CI)
#   stage N TITLE COMMAND...  runs COMMAND as stage N unless ONLY leaves it out; every stage
#                             runs even when an earlier one failed, each timed
#   suite_wanted N            whether stage N runs (for a stage that is prepared before it runs)
#   suite_summary             prints each stage's outcome and time, and what ONLY left out
#   suite_end                 exits 1 naming the failed stages (and the failures the suite
#                             added to `failed` itself, such as volumes left behind), else 0
#   pool_test [VAR=VALUE...] BIN ARG...
#                             runs BIN (a test binary of a suite's `pool_tests`) with ARG... and
#                             the variables exported (a stage's subshell keeps them), without
#                             its tests named in `host_only_tests` below

suite_init() {
  suite_name=$1
  suite_only=$2
  suite_start=$SECONDS
  suite_skipped=()
  failed=()
  summary=()
}

suite_wanted() {
  case $suite_only in
    "") return 0 ;;
    -*) [[ " ${suite_only#-} " != *" $1 "* ]] ;;
    *) [[ " $suite_only " == *" $1 "* ]] ;;
  esac
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
    echo "   NOT RUN here (stages \"$suite_only\" were asked for): stages $(printf '%s\n' "${suite_skipped[@]}" | sort -nu | paste -sd' ')"
}

# Tests of the suites' pool_tests binaries that never use the pool the suite names: they bring
# a `file` pool of their own (tests/concurrency.rs `own_file_pool`, for the file pool's image
# copy), so each VM pool would run the same test on the same file pool again. scripts/test runs
# them on the host (tests/concurrency.rs, with more race rounds); the VM suites leave them out.
host_only_tests=(
  concurrency:a_copy_longer_than_the_deadline_finishes_on_retry
  concurrency:a_copy_cut_by_kill_9_finishes_after_the_restart
)

pool_test() {
  while [[ $1 == [A-Z]*=* ]]; do
    export "$1"
    shift
  done
  local bin=$1 t e listed= skips=()
  shift
  t=$(basename "$bin")
  t=${t%-*}
  for e in "${host_only_tests[@]}"; do
    [ "${e%%:*}" = "$t" ] || continue
    # A renamed test would silently come back into every VM pool's run: the name must exist.
    listed=${listed:-$("$bin" --list --format terse)}
    grep -qx "${e#*:}: test" <<<"$listed" || {
      echo "suite-lib: host_only_tests names ${e#*:}, which tests/$t.rs no longer has" >&2
      return 1
    }
    skips+=(--skip "${e#*:}")
  done
  "$bin" "$@" "${skips[@]}"
}

suite_end() {
  # A mistyped stage number must not pass as an empty run.
  [ ${#summary[@]} -gt 0 ] || failed+=("no stage of this suite matched \"$suite_only\"")
  if [ ${#failed[@]} -gt 0 ]; then
    echo "$suite_name: FAILED: $(printf '%s\n' "${failed[@]}" | paste -sd';' | sed 's/;/; /g')"
    exit 1
  fi
  if [ ${#suite_skipped[@]} -gt 0 ]; then
    echo "$suite_name: the stages asked for passed (a partial run: not every stage ran)"
  else
    echo "$suite_name: all stages passed"
  fi
}
