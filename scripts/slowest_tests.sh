#!/usr/bin/env bash
# Prints the slowest tests of a ctest run, from the JUnit file the test presets write
# (CMakePresets.json: output.outputJUnitFile), so that CI shows the next test heading for
# its timeout before it gets there:
#
#   scripts/slowest_tests.sh build/default/ctest-junit.xml [count]
#
# A test over ATTN_SLOW_TEST_SECONDS (default 60, the most any test may take on the slowest
# machine CI runs on: a fifth of the unit tests' 300 s timeout) gets a warning, not a
# failure: the machines are shared, and one noisy run should be seen, not block a landing.
set -euo pipefail

junit=${1:?usage: slowest_tests.sh JUNIT_FILE [COUNT]}
count=${2:-10}
budget=${ATTN_SLOW_TEST_SECONDS:-60}

if [[ ! -f "$junit" ]]; then
  printf 'slowest_tests.sh: %s not found (did ctest run with --output-junit?)\n' "$junit" >&2
  exit 1
fi

# One line per test case: "seconds<TAB>name", the XML entities ctest writes undone.
# shellcheck disable=SC2016
tests=$(sed -n 's/.*<testcase name="\([^"]*\)".* time="\([0-9.eE+-]*\)".*/\2\t\1/p' "$junit" |
  sed -e 's/&lt;/</g' -e 's/&gt;/>/g' -e 's/&quot;/"/g' -e "s/&apos;/'/g" -e 's/&amp;/\&/g')
total=$(printf '%s\n' "$tests" | grep -c . || true)

shown=$((count < total ? count : total))
printf 'The %d slowest of %d tests (%s):\n' "$shown" "$total" "$junit"
# awk takes the first lines rather than head: head would stop reading, and sort, killed by
# SIGPIPE, would fail the pipeline under pipefail.
printf '%s\n' "$tests" | sort -t$'\t' -k1,1 -g -r |
  awk -F'\t' -v budget="$budget" -v count="$count" 'NR <= count {
    printf "  %8.2f s  %s\n", $1, $2
    if ($1 > budget) printf "  warning: over the %d s budget of one test\n", budget
  }'
