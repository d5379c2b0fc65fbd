#!/usr/bin/env bash
# Runs `seqnorm bench` twice — with glibc's default allocator (fresh multi-MB
# outputs page-fault) and with jemalloc retaining freed pages (outputs reuse
# memory) — and writes the two tables next to this script.
# jemalloc: `apt-get install libjemalloc2` (Debian); skipped when absent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
seqnorm bench --markdown "$here/results-glibc.md" "$@"
jemalloc="$(ls /usr/lib/*/libjemalloc.so.2 2>/dev/null | head -n 1 || true)"
if [ -n "$jemalloc" ]; then
    LD_PRELOAD="$jemalloc" MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1" \
        seqnorm bench --markdown "$here/results-jemalloc.md" "$@"
else
    echo "libjemalloc.so.2 not found: skipping the reused-output run" >&2
fi
