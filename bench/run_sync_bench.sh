#!/usr/bin/env bash
# Run the shared conntrackd benchmark harness against conntrackd AND ctsync, with the same
# parameters, alternating between the two so that load drift on a shared machine hits both.
#
#   sudo bench/run_sync_bench.sh                       # full comparison (about 30-40 min)
#   sudo bench/run_sync_bench.sh --sizes 1000,10000 --reps 1 --churn-rates 5000   # trial
#   sudo bench/run_sync_bench.sh --reps 3 -- --pin-daemons 1 --pin-writer 0       # pinned
#
# The harness runs one daemon per invocation, so this script calls it once per "slice"
# (scenarios A+B(+C) for one size, or churn at one rate) and daemon, with --reps 1, and
# flips which daemon goes first on every repetition. Afterwards it merges each daemon's
# invocations into one results.json + summary.md (rendered by the harness's own `summary`)
# and writes comparison.md, the medians side by side. See bench/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HARNESS=${HARNESS:-/work/shared/bench/conntrackd_bench.py}
PY=${PYTHON:-$ROOT/.venv/bin/python}
ADAPTER="$ROOT/bench/ctsync_adapter.py:CtsyncDaemon"

SIZES=1000,10000,100000
REPS=3
RATES=1000,5000,20000,50000,100000,150000,0
SCENARIOS=W,A,B,C,churn
DAEMONS=conntrackd,ctsync
GRANULARITY=slice
OUT=""
EXTRA=()

usage() {
    cat <<EOF
usage: $0 [options] [-- extra harness 'run' options]
  --sizes LIST          scenario A/B sizes (default $SIZES)
  --reps N              repetitions (default $REPS)
  --churn-rates LIST    churn ops/s, 0 = unpaced (default $RATES)
  --scenarios LIST      of W,A,B,C,churn (default $SCENARIOS); B and C imply A
  --daemons LIST        of conntrackd,ctsync (default $DAEMONS)
  --granularity G       slice: one invocation per size / churn rate and daemon (default);
                        rep: one invocation per repetition and daemon (fewer start-ups)
  --out DIR             results directory (default bench/results/sync-<timestamp>)
Anything after -- goes to every harness invocation, e.g. -- --pin-daemons 1 --pin-writer 0
Environment: PYTHON (default .venv/bin/python), HARNESS, CTSYNC_BENCH_* (see ctsync_adapter.py)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
    --sizes) SIZES=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --churn-rates) RATES=$2; shift 2 ;;
    --scenarios) SCENARIOS=$2; shift 2 ;;
    --daemons) DAEMONS=$2; shift 2 ;;
    --granularity) GRANULARITY=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$GRANULARITY" in slice | rep) ;; *) echo "--granularity: slice or rep" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "must run as root (namespaces, conntrack)" >&2; exit 1; }
[ -x "$PY" ] || { echo "no python at $PY (make venv, or set PYTHON)" >&2; exit 1; }
[ -f "$HARNESS" ] || { echo "no harness at $HARNESS" >&2; exit 1; }

has() { [[ ",$SCENARIOS," == *",$1,"* ]]; }
AB=""
for s in A B C; do has $s && AB="$AB,$s"; done
AB=${AB#,}
[ -n "$AB" ] && ! has A && AB="A,$AB" # B and C are measured on the entries A replicated
IFS=, read -r -a DLIST <<<"$DAEMONS"
IFS=, read -r -a SLIST <<<"$SIZES"
IFS=, read -r -a RLIST <<<"$RATES"

OUT=${OUT:-$ROOT/bench/results/sync-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/raw"
OUT=$(cd "$OUT" && pwd)

# The harness uses fixed names (netns bzfw1/bzfw2, /tmp/bzct-bench-state.json): one at a time.
exec 9>/tmp/bzct-run-sync-bench.lock
flock -n 9 || { echo "another run_sync_bench.sh is running" >&2; exit 1; }
if pgrep -f 'conntrackd_bench.py run' >/dev/null; then
    echo "a conntrackd_bench.py run is already in progress (it uses the same namespaces):" >&2
    pgrep -af 'conntrackd_bench.py run' >&2
    exit 1
fi

{
    echo "started: $(date '+%F %T')"
    echo "argv: $0 --sizes $SIZES --reps $REPS --churn-rates $RATES --scenarios $SCENARIOS" \
        "--daemons $DAEMONS --granularity $GRANULARITY -- ${EXTRA[*]:-}"
    echo "kernel: $(uname -r), cpus: $(nproc)"
    echo "loadavg: $(cat /proc/loadavg)"
    echo "conntrackd: $(conntrackd -v 2>&1 | head -1)"
    echo "ctsync: $("$PY" -m ctsync --version 2>&1) git $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')"
    echo "python: $PY ($("$PY" -V 2>&1))"
} >"$OUT/env.txt"
cat "$OUT/env.txt"

CHILD=""
on_signal() {
    echo "interrupted: stopping the harness (pid ${CHILD:-none}); it cleans up after itself" >&2
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null && wait "$CHILD" 2>/dev/null
    exit 130
}
trap on_signal INT TERM

NRUN=0
NFAIL=0
harness() { # harness DAEMON LABEL ARGS...
    local daemon=$1 label=$2
    shift 2
    local sel=(--daemon conntrackd)
    [ "$daemon" = ctsync ] && sel=(--daemon-class "$ADAPTER")
    [ "$daemon" = writer ] && sel=(--daemon conntrackd)
    mkdir -p "$OUT/raw/$daemon"
    NRUN=$((NRUN + 1))
    echo "=== [$(date +%T)] $daemon $label (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
    local rc=0
    "$PY" "$HARNESS" run "${sel[@]}" --results "$OUT/raw/$daemon" "$@" ${EXTRA[@]+"${EXTRA[@]}"} \
        >>"$OUT/raw/$daemon.stdout" 2> >(tee -a "$OUT/raw/$daemon.log" >&2) &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    if [ "$rc" != 0 ]; then
        NFAIL=$((NFAIL + 1))
        echo "$(date '+%F %T') $daemon $label: harness exited $rc (see raw/$daemon.log)" |
            tee -a "$OUT/failures.txt" >&2
    fi
}

T0=$(date +%s)
has W && harness writer "W sizes=$SIZES reps=$REPS" --scenarios W --sizes "$SIZES" --reps "$REPS" \
    --no-overheads

for ((rep = 1; rep <= REPS; rep++)); do
    order=("${DLIST[@]}")
    if ((rep % 2 == 0)); then # flip who goes first
        order=()
        for ((i = ${#DLIST[@]} - 1; i >= 0; i--)); do order+=("${DLIST[i]}"); done
    fi
    if [ "$GRANULARITY" = rep ]; then
        for d in "${order[@]}"; do
            sc=$AB
            has churn && sc="${sc:+$sc,}churn"
            harness "$d" "rep $rep/$REPS $sc" --scenarios "$sc" --sizes "$SIZES" \
                --churn-rates "$RATES" --reps 1
        done
        continue
    fi
    if [ -n "$AB" ]; then
        for n in "${SLIST[@]}"; do
            for d in "${order[@]}"; do
                harness "$d" "rep $rep/$REPS $AB N=$n" --scenarios "$AB" --sizes "$n" --reps 1
            done
        done
    fi
    if has churn; then
        for r in "${RLIST[@]}"; do
            for d in "${order[@]}"; do
                harness "$d" "rep $rep/$REPS churn R=$r" --scenarios churn --churn-rates "$r" \
                    --reps 1 --no-overheads
            done
        done
    fi
done
trap - INT TERM

# ---- merge each daemon's invocations, render with the harness, compare -------------------
"$PY" - "$OUT" "$HARNESS" "${DLIST[@]}" <<'PYEOF'
import glob, json, os, statistics, subprocess, sys

out, harness, daemons = sys.argv[1], sys.argv[2], sys.argv[3:]


def merge(name):
    files = sorted(glob.glob(os.path.join(out, 'raw', name, '*', 'results.json')))
    if not files:
        return None
    res = {'meta': {}, 'W': [], 'A': [], 'B': [], 'churn': []}
    ovs, seen = [], {}
    for fn in files:
        with open(fn) as f:
            r = json.load(f)
        if not res['meta']:
            res['meta'] = dict(r['meta'])
        res['meta']['finished'] = r['meta'].get('finished')
        res['meta']['loadavg_end'] = r['meta'].get('loadavg_end')
        if r['meta'].get('overheads'):
            ovs.append(r['meta']['overheads'])
        for sc, key in (('W', 'N'), ('A', 'N'), ('B', 'N'), ('churn', 'rate_target')):
            for rec in r[sc]:
                k = (sc, rec[key])
                seen[k] = seen.get(k, 0) + 1
                rec['rep'] = seen[k]          # every invocation ran --reps 1
                rec['run_dir'] = os.path.relpath(os.path.dirname(fn), out)
                res[sc].append(rec)
    res['meta']['merged_from'] = [os.path.relpath(os.path.dirname(f), out) for f in files]
    if ovs:  # per-invocation poll costs were already subtracted; show their median
        med = {}
        for k in ('idle_cpu_per_s', 'polled_cpu_per_s', 'per_poll_cpu_s'):
            med[k] = {n: statistics.median(o[k][n] for o in ovs) for n in ovs[0][k]}
        med['polls_per_s'] = statistics.median(o['polls_per_s'] for o in ovs)
        res['meta']['overheads'] = med
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, 'results.json'), 'w') as f:
        json.dump(res, f, indent=1)
    md = subprocess.run([sys.executable, harness, 'summary', os.path.join(d, 'results.json')],
                        capture_output=True, text=True, check=True).stdout
    with open(os.path.join(d, 'summary.md'), 'w') as f:
        f.write(md)
    return res


def med(vals, fmt='%.3f'):
    v = [x for x in vals if x is not None]
    if not v:
        return 'n/a'
    s = fmt % statistics.median(v)
    return s + (' (%d/%d n/a)' % (len(vals) - len(v), len(vals)) if len(v) < len(vals) else '')


merged = {}
for name in ['writer'] + daemons:
    r = merge(name)
    if r is not None:
        merged[name] = r
ds = [d for d in daemons if d in merged]
L = ['# conntrackd vs ctsync, same harness, same parameters', '',
     'Medians over repetitions (per-daemon min/median/max: `<daemon>/summary.md`; raw runs, '
     'stats and logs: `raw/<daemon>/<run>/`). Environment: `env.txt`.', '']
if 'writer' in merged and merged['writer']['W']:
    W = merged['writer']['W']
    L += ['W (writer alone): ' + ', '.join('N=%d %s s' % (n, med([r['writer_s'] for r in W if r['N'] == n]))
                                          for n in sorted({r['N'] for r in W})), '']


def table(title, head, rows):
    L.extend(['## ' + title, '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)])
    L.extend('| ' + ' | '.join(map(str, r)) + ' |' for r in rows)
    L.append('')


rows = []
for n in sorted({r['N'] for d in ds for r in merged[d]['A']}):
    for d in ds:
        rs = [r for r in merged[d]['A'] if r['N'] == n]
        if not rs:
            continue
        rows.append([n, d, '%d/%d' % (sum(r['complete'] for r in rs), len(rs)),
                     med([r['writer_s'] for r in rs]), med([r['fw2_external_full_s'] for r in rs]),
                     med([r['lag_after_writer_s'] for r in rs]),
                     med([r.get('cpu_fw1_net_us_per_entry') for r in rs], '%.1f'),
                     med([r.get('cpu_fw2_net_us_per_entry') for r in rs], '%.1f'),
                     med([r['counters']['fw1'].get('netlink_overrun') for r in rs], '%d'),
                     med([r['counters']['fw2'].get('msg_lost') for r in rs], '%d')])
if rows:
    table('A replication (+C CPU)', ['N', 'daemon', 'complete', 'writer s', 'fw2 ext holds N s',
                                     'lag after writer s', 'fw1 µs/entry', 'fw2 µs/entry',
                                     'fw1 overrun', 'fw2 lost msgs'], rows)
rows = []
for n in sorted({r['N'] for d in ds for r in merged[d]['B']}):
    for d in ds:
        rs = [r for r in merged[d]['B'] if r['N'] == n]
        if not rs:
            continue
        steps = []
        for lab in [s['step'] for s in rs[0]['promote_steps']]:
            steps.append('%s %s' % (lab.split()[0], med([s['s'] for r in rs for s in r['promote_steps']
                                                       if s['step'] == lab])))
        rows.append([n, d, med([r['commit_cmd_s'] for r in rs]), med([r['kernel_full_s'] for r in rs]),
                     med([r['daemon_reported_commit_s'] for r in rs]),
                     med([r['kernel_final'] for r in rs], '%d'), med([r['cpu_fw2_commit_s'] for r in rs]),
                     '; '.join(steps), med([r['promote_fw2_internal_full_s'] for r in rs]),
                     med([r['promote_fw1_external_full_s'] for r in rs])])
if rows:
    table('B commit on fw2, B2 promote steps', ['N', 'daemon', 'commit cmd returns s',
          'kernel holds N s', 'daemon-reported s', 'committed', 'CPU fw2 commit s',
          'B2 steps s (-f; -R; -B)', 'fw2 int holds N s', 'fw1 ext holds N s'], rows)
rows = []
for rate in sorted({r['rate_target'] for d in ds for r in merged[d]['churn']}, key=lambda x: (x == 0, x)):
    for d in ds:
        rs = [r for r in merged[d]['churn'] if r['rate_target'] == rate]
        if not rs:
            continue
        fd = ' '.join('%s/%s/%s' % (r['first_diff']['missing'], r['first_diff']['extra'],
                                    r['first_diff']['stale_mark']) if r['first_diff'] else '-' for r in rs)
        rows.append([rate or 'max', d, med([r['rate_achieved'] for r in rs], '%.0f'),
                     '%d/%d' % (sum(r['lossless'] for r in rs), len(rs)),
                     med([r['converge_after_end_s'] for r in rs]), fd,
                     med([r['delta']['fw1']['netlink_overrun'] for r in rs], '%d'),
                     med([r['delta']['fw2']['msg_lost'] for r in rs], '%d'),
                     med([1e6 * r['cpu_fw1_sched_s'] / r['ops'] for r in rs], '%.1f'),
                     med([1e6 * r['cpu_fw2_sched_s'] / r['ops'] for r in rs], '%.1f')])
if rows:
    table('churn', ['target ops/s', 'daemon', 'achieved ops/s', 'lossless', 'converge after end s',
                    'first diff miss/extra/stale', 'fw1 overrun', 'fw2 lost msgs', 'fw1 µs/op',
                    'fw2 µs/op'], rows)
L += ['Notes: ctsync\'s "Lost msgs" counts DATA never applied (unrepaired loss); conntrackd\'s counts '
      'sequence gaps (FTFW repairs most). ctsync client commands (commit, flush, resync, bulk-send) '
      'are Python processes: their start-up (~0.2 s) is in "commit cmd returns" and the B2 step '
      'times; "daemon-reported" is the agent\'s own figure.', '']
with open(os.path.join(out, 'comparison.md'), 'w') as f:
    f.write('\n'.join(L))
PYEOF

echo
echo "done in $(($(date +%s) - T0)) s: $NRUN harness runs, $NFAIL failed"
[ -f "$OUT/failures.txt" ] && cat "$OUT/failures.txt"
echo "results:"
echo "  $OUT/comparison.md            medians side by side"
for d in "${DLIST[@]}"; do
    [ -f "$OUT/$d/summary.md" ] && echo "  $OUT/$d/summary.md  (min/median/max; results.json)"
done
echo "  $OUT/raw/<daemon>/<run>/      per-invocation results.json, stats/, logs/"
echo "  $OUT/raw/<daemon>.log         harness progress log"
