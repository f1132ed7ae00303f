#!/usr/bin/env bash
# Throughput of the core pipeline (sql/engagement.sql) beside the physical limit.
#
# On throwaway Postgres and Redis (`engage services`), in one run:
#   1. generate a backlog of EVENTS events (`engage generate`, as fast as it goes);
#   2. drain that WAL with pg_recvlogical (pgoutput, same publication) -> the limit;
#   3. drain the same WAL with `engage run --end-lsn` (Parquet + Redis sinks,
#      final checkpoint included) -> engage's rate, peak RSS, CPU seconds;
#   4. run the generator flat out for LIVE_SECONDS while the job runs, and report
#      both rates and how long the job needs to catch up afterwards.
# Prints one line per figure and writes JSON to $REPORT (default bench-core.json).
# Uses a release build; figures are only meaningful on an otherwise idle machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
EVENTS="${EVENTS:-1000000}"
LIVE_SECONDS="${LIVE_SECONDS:-20}"
REPORT="${REPORT:-bench-core.json}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/engage/target}"
cargo build --release -q -p engage --bin engage
ENGAGE="$CARGO_TARGET_DIR/release/engage"
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

WORK="$(mktemp -d /tmp/engage-bench-XXXXXX)"
chmod 755 "$WORK" # initdb runs as the postgres user, which must reach its directory
"$ENGAGE" services --dir "$WORK/services" >"$WORK/env" 2>"$WORK/services.log" &
SERVICES=$!
cleanup() { kill "$SERVICES" 2>/dev/null || true; wait "$SERVICES" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do [ "$(wc -l <"$WORK/env")" -ge 2 ] && break; sleep 0.1; done
# shellcheck disable=SC1091
source "$WORK/env"
export ENGAGE_DATA_DIR="$WORK/data"
psql() { command psql -X -q -At "$ENGAGE_POSTGRES_URL" "$@"; }
now() { date +%s.%N; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n / s }'; }
CK="$WORK/checkpoints"
SLOT=engage_engagement

echo "== setup: schema, content, the job's slot, a pg_recvlogical slot"
"$ENGAGE" generate --count 1 --content-items 10000 >/dev/null
"$ENGAGE" run sql/engagement.sql --checkpoint-dir "$CK" --end-lsn "$(psql -c 'SELECT pg_current_wal_lsn()')" 2>"$WORK/setup.log"
"$PGBIN/pg_recvlogical" -d "$ENGAGE_POSTGRES_URL" --slot bench_recv --create-slot -P pgoutput

echo "== backlog: $EVENTS events"
start=$(now)
"$ENGAGE" generate --count "$EVENTS" --content-items 10000 >/dev/null
generate_secs=$(awk -v a="$start" -v b="$(now)" 'BEGIN { print b - a }')
# The insert position: with synchronous_commit off the write position can trail the last commit.
END_LSN=$(psql -c 'SELECT pg_current_wal_insert_lsn()')
WAL_BYTES=$(psql -c "SELECT pg_wal_lsn_diff('$END_LSN', confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = '$SLOT'")
# A transaction after the end, so both readers see a commit at or past it.
psql -c "UPDATE content SET title = title WHERE id = (SELECT id FROM content LIMIT 1)"

echo "== pg_recvlogical drains the WAL"
start=$(now)
"$PGBIN/pg_recvlogical" -d "$ENGAGE_POSTGRES_URL" --slot bench_recv --start --no-loop \
    -o proto_version=1 -o publication_names="$SLOT" --endpos="$END_LSN" -f /dev/null
recv_secs=$(awk -v a="$start" -v b="$(now)" 'BEGIN { print b - a }')

echo "== engage run drains the same WAL (Parquet + Redis, final checkpoint)"
start=$(now)
/usr/bin/time -f "%M %U %S" -o "$WORK/time" \
    "$ENGAGE" run sql/engagement.sql --checkpoint-dir "$CK" --end-lsn "$END_LSN" 2>"$WORK/drain.log"
engage_secs=$(awk -v a="$start" -v b="$(now)" 'BEGIN { print b - a }')
read -r rss_kb user_s sys_s <"$WORK/time"
rows=$("$ENGAGE" query "SELECT count(*) FROM enriched_events" --format csv | tail -1)

echo "== live: generator flat out for ${LIVE_SECONDS}s while the job runs"
"$ENGAGE" run sql/engagement.sql --checkpoint-dir "$CK" 2>"$WORK/live.log" &
JOB=$!
before=$(psql -c "SELECT count(*) FROM engagement_events")
start=$(now)
"$ENGAGE" generate --duration "$LIVE_SECONDS" --content-items 10000 >/dev/null
gen_end=$(now)
live_events=$(( $(psql -c "SELECT count(*) FROM engagement_events") - before ))
LIVE_END=$(psql -c 'SELECT pg_current_wal_lsn()')
until [ "$(psql -c "SELECT confirmed_flush_lsn >= '$LIVE_END' FROM pg_replication_slots WHERE slot_name = '$SLOT'")" = t ]; do
    psql -c "SELECT pg_logical_emit_message(false, 'engage-bench', 'tick')" >/dev/null
    sleep 0.2
done
caught_up=$(now)
kill -TERM "$JOB"; wait "$JOB" || true
live_gen_secs=$(awk -v a="$start" -v b="$gen_end" 'BEGIN { print b - a }')
live_total_secs=$(awk -v a="$start" -v b="$caught_up" 'BEGIN { print b - a }')
catchup_secs=$(awk -v a="$gen_end" -v b="$caught_up" 'BEGIN { print b - a }')

recv_rate=$(rate "$EVENTS" "$recv_secs")
engage_rate=$(rate "$EVENTS" "$engage_secs")
ratio=$(awk -v a="$engage_rate" -v b="$recv_rate" 'BEGIN { printf "%.2f", a / b }')
printf '\n%-44s %s\n' "backlog events" "$EVENTS"
printf '%-44s %s events/s (%.1f s)\n' "engage generate (COPY, no consumer)" "$(rate "$EVENTS" "$generate_secs")" "$generate_secs"
printf '%-44s %s MiB\n' "WAL to decode" "$((WAL_BYTES / 1048576))"
printf '%-44s %s events/s (%.1f s)\n' "pg_recvlogical drain (physical limit)" "$recv_rate" "$recv_secs"
printf '%-44s %s events/s (%.1f s)\n' "engage run drain, end to end" "$engage_rate" "$engage_secs"
printf '%-44s %s\n' "engage / pg_recvlogical" "$ratio"
printf '%-44s %s MiB, %s s user + %s s sys\n' "engage peak RSS, CPU" "$((rss_kb / 1024))" "$user_s" "$sys_s"
printf '%-44s %s\n' "rows in enriched_events after the drain" "$rows"
printf '%-44s %s events/s generated, %s events/s processed, caught up %.1f s after\n' \
    "live (generator + job on 2 cores)" "$(rate "$live_events" "$live_gen_secs")" "$(rate "$live_events" "$live_total_secs")" "$catchup_secs"
cat >"$REPORT" <<JSON
{"events": $EVENTS, "wal_bytes": $WAL_BYTES, "generate_secs": $generate_secs,
 "pg_recvlogical_secs": $recv_secs, "pg_recvlogical_events_per_sec": $recv_rate,
 "engage_secs": $engage_secs, "engage_events_per_sec": $engage_rate, "ratio": $ratio,
 "engage_peak_rss_kb": $rss_kb, "engage_user_secs": $user_s, "engage_sys_secs": $sys_s,
 "live_events": $live_events, "live_generate_secs": $live_gen_secs, "live_catchup_secs": $catchup_secs}
JSON
echo "report: $REPORT"
