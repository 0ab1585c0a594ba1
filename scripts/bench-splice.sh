#!/usr/bin/env bash
# Writes one benchmark's output into BENCHMARKS.md, between that benchmark's markers:
#
#   <!-- bench:NAME -->
#   (a line saying when, on what machine, at which commit and with which command it was measured,
#    then the benchmark's markdown)
#   <!-- /bench:NAME -->
#
# Everything outside the markers (headings, what the figures mean) and every other block stays as
# it was.
#
#   scripts/bench-splice.sh NAME OUTPUT COMMAND
#
# OUTPUT is the markdown the benchmark printed. Its level-1 title is dropped and its other
# headings become bold lines, so that they do not break the document's outline. COMMAND is the
# one command that reproduces it. BENCHMARKS_MD names another file to write (a trial run).
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: scripts/bench-splice.sh NAME OUTPUT COMMAND" >&2
  exit 2
fi
name=$1
output=$2
command=$3
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
doc=${BENCHMARKS_MD:-$root/BENCHMARKS.md}
begin="<!-- bench:$name -->"
end="<!-- /bench:$name -->"

[[ -s $output ]] || { echo "bench-splice: $output is empty or missing" >&2; exit 1; }
if [[ $(grep -cxF "$begin" "$doc") != 1 || $(grep -cxF "$end" "$doc") != 1 ]]; then
  echo "bench-splice: $doc needs exactly one '$begin' and one '$end' line" >&2
  exit 1
fi

# The machine, the code and the time of the measurement.
cores=$(nproc)
cpu=$(sed -n 's/^model name[[:space:]]*: *//p' /proc/cpuinfo | head -n 1)
ram=$(awk '/^MemTotal:/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
load=$(awk '{ print $1 ", " $2 ", " $3 }' /proc/loadavg)
if commit=$(git -C "$root" rev-parse --short=10 HEAD 2>/dev/null); then
  # BENCHMARKS.md itself changes as blocks are written; any other change means the code measured
  # is not exactly that commit.
  if [[ -n $(git -C "$root" status --porcelain --untracked-files=no -- . ':(exclude)BENCHMARKS.md') ]]; then
    dirty=" with uncommitted changes"
  fi
  commit="commit \`$commit\`${dirty:-}"
else
  commit="an unknown commit (not a git checkout)"
fi

block=$(mktemp)
trap 'rm -f "$block" "$block.doc"' EXIT
{
  echo
  echo "Measured $(date -u +%Y-%m-%d) at $commit on ${cores} cores (${cpu:-unknown CPU}), $ram of RAM, load average $load (1, 5, 15 min) at the end, with \`$command\`."
  echo
  # Drop the title and the blank lines around the output; headings become bold lines.
  sed -E '/^# /d; s/^#{2,6} +(.*[^ ]) *$/**\1**/' "$output" |
    awk 'NF { started = 1 } started { lines[++n] = $0 } END { while (n > 0 && lines[n] ~ /^[[:space:]]*$/) n--; for (i = 1; i <= n; i++) print lines[i] }'
  echo
} >"$block"

awk -v begin="$begin" -v end="$end" -v block="$block" '
  $0 == begin { print; while ((getline line < block) > 0) print line; skipping = 1; next }
  $0 == end { skipping = 0 }
  !skipping { print }
' "$doc" >"$block.doc"
cat "$block.doc" >"$doc"
echo "bench-splice: wrote $name into $doc"
