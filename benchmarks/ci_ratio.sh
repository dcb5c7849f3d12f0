#!/usr/bin/env bash
# The CI ratio: a cold `make test` (.ci/run) of NEW against the same suite on OLD, one after the
# other on this machine. NEW runs only the test modules OLD had, so both run the same tests.
# Each run: a fresh clone, an empty HOME (no pip or factory cache). Needs root and what
# `make setup` installs; about 80 min on 2 cores under TCG. Do not run it beside other work.
#   benchmarks/ci_ratio.sh [OLD_REV] [NEW_REV]      writes benchmarks/results/ci-ratio.json
set -euo pipefail
OLD=${1:-a4bf303}
NEW=${2:-HEAD}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /var/tmp/factory-ci-ratio.XXXXXX)
RESULTS=$REPO/benchmarks/results/ci-ratio.json

cold_run() {  # cold_run TAG REV [pytest options]: clone, run .ci/run, keep the log and JUnit
    local tag=$1 rev=$2
    shift 2
    git clone -q "$REPO" "$WORK/$tag"
    git -C "$REPO" rev-parse "$rev" >"$WORK/$tag.commit"
    git -C "$WORK/$tag" checkout -q "$(cat "$WORK/$tag.commit")"
    mkdir "$WORK/$tag-home"
    echo "ci-ratio: $tag ($rev): cold .ci/run, log in $WORK/$tag.log" >&2
    local start
    start=$(date +%s)
    (cd "$WORK/$tag" && HOME="$WORK/$tag-home" \
        PYTEST_ADDOPTS="--junitxml=$WORK/$tag.xml $*" timeout 5400 .ci/run) \
        >"$WORK/$tag.log" 2>&1 || echo "ci-ratio: $tag failed, see $WORK/$tag.log" >&2
    echo $(($(date +%s) - start)) >"$WORK/$tag.seconds"
}

# NEW's test modules that OLD did not have are left out.
comm -13 <(git -C "$REPO" ls-tree -r --name-only "$OLD" tests | grep '/test_[^/]*\.py$' | sort) \
    <(git -C "$REPO" ls-tree -r --name-only "$NEW" tests | grep '/test_[^/]*\.py$' | sort) \
    >"$WORK/left-out.txt"
mapfile -t ignores < <(sed 's/^/--ignore=/' "$WORK/left-out.txt")
cold_run new "$NEW" "${ignores[@]}"
cold_run old "$OLD"

cd "$REPO" && python3 -m benchmarks.ci_ratio_summary "$WORK" "$OLD" "$NEW" "$RESULTS"
# The clones and their caches take several GB: keep only the logs, JUnit files and timings.
rm -rf "$WORK/old" "$WORK/new" "$WORK/old-home" "$WORK/new-home"
echo "ci-ratio: logs and JUnit files kept in $WORK" >&2
