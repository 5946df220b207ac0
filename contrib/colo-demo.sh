#!/usr/bin/env bash
# The whole COLO story with colo-blk, in one command, on loopback:
#
#   1. a real QEMU 7.2 COLO pair (KVM, boot-sector guest that writes, reads back and
#      verifies its disk in a loop) on a colo-blk primary + secondary, checkpointing
#      (contrib/colo-qemu/colo-pair.sh --keep);
#   2. the primary host "dies" (kill -9 of the primary QEMU and of its colo-blk), the
#      secondary fails over; its disk must equal "last checkpoint + the secondary VM's
#      own writes since": checkdisk against the VM's final RAM state, and the guest must
#      have seen no I/O error;
#   3. the survivor is re-protected: a fresh colo-blk secondary with an empty disk, the
#      survivor becomes a primary with a full sync; once in sync (and after a barrier)
#      the two disk files must be byte-identical; the survivor VM then runs a little
#      more, its writes are mirrored, and the disks must be identical again.
#
# A timeline goes to stdout; the last line is "COLO demo: PASS (...)" or
# "COLO demo: FAIL (reasons)", and the exit status is 0 only for PASS.
#
# Usage:
#   contrib/colo-demo.sh [--workdir DIR] [--checkpoints K] [--keep-workdir]
#                        [--colo-blk BIN] [--port N]
#
#   --workdir DIR     where images, sockets and logs go (must be empty or absent;
#                     default: mktemp -d /tmp/colo-demo.XXXXXX)
#   --checkpoints K   COLO checkpoints before the primary is killed (default 5)
#   --keep-workdir    keep the work directory after a PASS (it is always kept after a
#                     FAIL, and a directory given with --workdir is never removed)
#   --colo-blk BIN    the colo-blk binary (default: target/release/colo-blk of this repo)
#   --port N          migration port on 127.0.0.1 (default: colo-pair.sh's, 9998)
#
# Needs KVM and the QEMU 7.2 tree of contrib/colo-qemu/fetch-qemu72.sh.  Every process
# the demo (or colo-pair.sh for it) started is ended at exit, also on failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cq=$here/colo-qemu

WORKDIR='' K=5 KEEP_WORKDIR=0 COLOBLK=$repo/target/release/colo-blk PORT='' NO_HOOK=0
DELAY_MS=500  # x-checkpoint-delay: short, so that the demo stays short
AFTER=2       # seconds the survivor runs after the failover, inside colo-pair.sh
while [[ $# -gt 0 ]]; do
    case $1 in
    --workdir) WORKDIR=$2; shift ;;
    --checkpoints) K=$2; shift ;;
    --keep-workdir) KEEP_WORKDIR=1 ;;
    --colo-blk) COLOBLK=$2; shift ;;
    --port) PORT=$2; shift ;;
    --no-hook) NO_HOOK=1 ;; # hidden: colo-pair's control experiment, must end in FAIL
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//; /^set -e/d'; exit 0 ;;
    *) echo "colo-demo.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ ! -x $COLOBLK ]]; then
    echo "colo-demo.sh: no colo-blk binary at $COLOBLK" >&2
    echo "  build it with: (cd $repo && cargo build --release), or pass --colo-blk BIN" >&2
    exit 2
fi
COLOBLK=$(cd "$(dirname "$COLOBLK")" && pwd)/$(basename "$COLOBLK")
[[ $K =~ ^[1-9][0-9]*$ ]] || { echo "colo-demo.sh: --checkpoints wants a positive integer" >&2; exit 2; }

MADE_WORKDIR=0
if [[ -z $WORKDIR ]]; then
    WORKDIR=$(mktemp -d /tmp/colo-demo.XXXXXX)
    MADE_WORKDIR=1
else
    mkdir -p "$WORKDIR"
    if [[ -n $(ls -A "$WORKDIR") ]]; then
        echo "colo-demo.sh: --workdir $WORKDIR is not empty" >&2
        exit 2
    fi
fi
W=$(cd "$WORKDIR" && pwd)
cd "$W"

T0=$(date +%s.%N)
export DEMO_T0=$T0

# ---- timeline and verdict ------------------------------------------------------
say() { # TEXT...   one timeline line, stamped now
    local now rel
    now=$(date +%s.%N)
    rel=$(awk -v a="$now" -v b="$T0" 'BEGIN { printf "%+8.3f", a - b }')
    printf '%s %ss  %s\n' "$(date -d "@$now" +%T.%3N)" "$rel" "$*"
}
FAILS=()
fail() { FAILS+=("$*"); say "FAIL: $*"; }
finish() { # the summary line; exit status 0 only without failures
    local reasons
    if [[ ${#FAILS[@]} == 0 ]]; then
        echo "COLO demo: PASS ($*)"
        exit 0
    fi
    reasons=$(printf '%s; ' "${FAILS[@]}")
    echo "COLO demo: FAIL (${reasons%; })"
    exit 1
}
trap 'echo "COLO demo: FAIL (unexpected error in line $LINENO: $BASH_COMMAND)"' ERR

# ---- processes -----------------------------------------------------------------
OWN_PIDS=() # pids started here: the event watcher, colo-pair.sh, the new secondary
stop_pid() { # PID SIGNAL: signal PID if it is still one of ours (its command line names $W)
    local pid=$1
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 0
    tr '\0' ' ' </proc/"$pid"/cmdline | grep -qF -- "$W" || return 0
    kill "-$2" "$pid" 2>/dev/null || true
}
alive() { # PID...: true if one of them still runs (a zombie does not count)
    local pid st
    for pid in "$@"; do
        [[ -n $pid && -r /proc/$pid/stat ]] || continue
        st=$(</proc/"$pid"/stat) || continue
        st=${st##*) }
        [[ ${st:0:1} != Z ]] && return 0
    done
    return 1
}
wait_gone() { # TIMEOUT_S PID...: poll until the pids are gone
    local t=$1 i
    shift
    for ((i = 0; i < t * 50; i++)); do
        alive "$@" || return 0
        sleep 0.02
    done
    return 1
}
pidfiles() { # FILE...: the pids recorded in these files of the work directory
    local f
    for f in "$@"; do [[ -s $W/$f ]] && cat "$W/$f"; done
    return 0
}
stop_all() { # PID...: TERM, wait (bounded), KILL what is left; false if some never exited
    local pid
    for pid in "$@"; do stop_pid "$pid" TERM; done
    wait_gone 10 "$@" && return 0
    for pid in "$@"; do stop_pid "$pid" KILL; done
    wait_gone 5 "$@" && return 0
    echo "colo-demo.sh: some processes did not exit: $*" >&2
    return 1
}
cleanup() {
    local rc=$? qemus backends ok=1
    trap - EXIT INT TERM
    mapfile -t qemus < <(pidfiles p.pid s.pid)
    mapfile -t backends < <(pidfiles p.blk.pid s.blk.pid; printf '%s\n' "${OWN_PIDS[@]:-}")
    # The QEMUs (vhost-user frontends) first, then colo-blk, the watcher and colo-pair.sh.
    stop_all "${qemus[@]:-}" || ok=0
    stop_all "${backends[@]:-}" || ok=0
    [[ $ok == 0 ]] || wait 2>/dev/null || true # reap our own children
    [[ $ok == 1 || $rc != 0 ]] || rc=1
    if [[ $rc == 0 && $KEEP_WORKDIR == 0 && $MADE_WORKDIR == 1 ]]; then
        cd / && rm -rf "$W"
    else
        echo "colo-demo.sh: work directory kept: $W" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_socket() { # PATH TIMEOUT_S
    local i
    for ((i = 0; i < $2 * 50; i++)); do
        [[ -S $1 ]] && return 0
        sleep 0.02
    done
    return 1
}
ctl() { # SIDE COMMAND [ARGS...]   (SIDE: p, s or n = the new secondary)
    local side=$1
    shift
    "$COLOBLK" ctl --qmp "$W/$side.blk.qmp" "$@"
}

# ---- helper (event watcher, timeline builder, QMP waits) ------------------------
cat >"$W/demo.py" <<'PYEOF'
"""colo-demo.sh's helper: QMP event watcher, timeline builder and bounded waits."""
import json
import os
import re
import select
import socket
import sys
import time

T0 = float(os.environ["DEMO_T0"])
CQ = os.environ["DEMO_CQ"]
sys.path.insert(0, CQ)
from qmp import Qmp, read_guest_state  # noqa: E402


def say(ts, text):
    lt = time.localtime(ts)
    ms = int((ts % 1) * 1000)
    print(f"{time.strftime('%H:%M:%S', lt)}.{ms:03d} {ts - T0:+8.3f}s  {text}", flush=True)


def load_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def events(path, src=None, name=None, since=0.0):
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if src and e["src"] != src or name and e["event"] != name or e["ts"] < since:
                    continue
                out.append(e)
    except OSError:
        pass
    return out


def mib(n):
    return f"{n / 1048576:.1f} MiB" if n >= 1048576 else f"{n} B"


# -- watch OUT name=path...: record every colo-blk QMP event with its timestamp ----
def watch(out_path, specs):
    want = dict(s.split("=", 1) for s in specs)
    out = open(out_path, "a", buffering=1)
    parent = os.getppid()
    conns = {}  # socket -> [name, buffer]
    finished = set()

    def rec(name, event, data=None, ts=None):
        now = time.time()
        out.write(json.dumps({"src": name, "event": event, "data": data or {},
                              "ts": ts if ts is not None else now, "rx": now}) + "\n")

    while os.getppid() == parent:
        busy = {c[0] for c in conns.values()}
        for name, path in want.items():
            if name in finished or name in busy or not os.path.exists(path):
                continue
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                s.sendall(b'{"execute":"qmp_capabilities","id":"watch"}\n')
            except OSError:
                s.close()
                continue
            conns[s] = [name, b""]
        r, _, _ = select.select(list(conns), [], [], 0.02)
        for s in r:
            name = conns[s][0]
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                rec(name, "_closed")
                finished.add(name)
                del conns[s]
                s.close()
                continue
            conns[s][1] += data
            while b"\n" in conns[s][1]:
                line, conns[s][1] = conns[s][1].split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("id") == "watch":
                    rec(name, "_connected")
                elif "event" in msg:
                    t = msg.get("timestamp", {})
                    rec(name, msg["event"], msg.get("data"),
                        t.get("seconds", 0) + t.get("microseconds", 0) / 1e6)


# -- timeline W PAIR_END: the COLO part of the story, from the pair's artefacts ----
def timeline(w, pair_end):
    ev = os.path.join(w, "events.jsonl")
    res = load_json(os.path.join(w, "result.json"), {})
    facts = {"checkpoints": 0, "checkpoints_with_barrier": 0, "commits": 0, "checkpoint_guest_errors": 0,
             "final_errors": None, "merged": None, "survivor_stage": None}
    lines = []  # (ts, text)

    # colo_drive.py logs relative to its own start; anchor that on the epoch via the
    # primary's STOP events (QEMU event timestamps) of the checkpoints.
    drive = []
    try:
        for line in open(os.path.join(w, "drive.log")):
            m = re.match(r"^\[\s*([\d.]+)\] (.*)$", line.rstrip("\n"))
            if m:
                drive.append((float(m.group(1)), m.group(2)))
    except OSError:
        pass
    cks = res.get("checkpoints", [])
    i_colo = next((i for i, (_, t) in enumerate(drive) if t.startswith("COLO established")), None)
    anchor = None
    if i_colo is not None and cks:
        stops = [r for r, t in drive[i_colo:] if t == "P event STOP {}"]
        cands = [c["t_stop"] - r for c, r in zip(cks, stops)]
        anchor = max(cands) if cands else None

    def dline(prefix):
        for r, t in drive:
            if t.startswith(prefix):
                return r, t
        return None, None

    def at(rel):
        return anchor + rel if anchor is not None and rel is not None else None

    pst = res.get("primary_state_before_migrate")
    r, _ = dline("primary guest before migrate")
    if pst and at(r):
        lines.append((at(r), f"primary VM booted, its disk loop at counter {pst['counter']}; "
                             "migrating it to the secondary (COLO)"))
    r, t = dline("COLO established")
    if at(r):
        lines.append((at(r), f"COLO entered ({t.split('after ')[-1]} after migrate): both VMs run, "
                             "the secondary checkpointed from the primary"))

    # per-barrier facts from the colo-blk logs (latency on the primary, sectors dropped
    # on the secondary); timestamps come from the events, the logs have whole seconds
    confirm, dropped = {}, {}
    try:
        for line in open(os.path.join(w, "p.blk.log")):
            m = re.search(r"checkpoint barrier (\d+) confirmed by the secondary in ([\d.]+) ms", line)
            if m:
                confirm[int(m.group(1))] = m.group(2)
    except OSError:
        pass
    took = None
    try:
        for line in open(os.path.join(w, "s.blk.log")):
            m = re.search(r"checkpoint took [\d.]+ ms \((\d+) active \+ (\d+) hidden sectors dropped\)", line)
            if m:
                took = (m.group(1), m.group(2))
            m = re.search(r"checkpoint (\d+) committed \(", line)
            if m and took:
                dropped[int(m.group(1))] = took
                took = None
    except OSError:
        pass
    barriers = {e["data"]["barrier"]: e for e in events(ev, "s", "COLO_BARRIER")}
    commits = {e["data"]["barrier"]: e for e in events(ev, "s", "COLO_CHECKPOINT")}

    def barrier_text(n):
        parts = [f"barrier {n} confirmed to the primary in {confirm.get(n, '?')} ms"]
        c = commits.get(n)
        if c:
            d = c["data"]
            parts.append(f"secondary committed it ({d['trigger']}, {d['duration-us'] / 1000:.1f} ms"
                         + (f", {dropped[n][0]} active + {dropped[n][1]} hidden sectors dropped)"
                            if n in dropped else ")"))
        else:
            parts.append("not committed")
        return "; ".join(parts)

    used = set()
    for c in cks:
        t_resume = c["t_stop"] + c["primary_stop_to_resume_ms"] / 1000
        b = next((n for n, e in sorted(barriers.items())
                  if n not in used and c["t_stop"] - 0.005 <= e["ts"] <= t_resume + 0.005), None)
        text = f"checkpoint {c['n']}: primary VM paused {c['primary_stop_to_resume_ms']:.1f} ms"
        if b is None:
            text += "; NO checkpoint barrier reached the secondary colo-blk"
        else:
            used.add(b)
            facts["checkpoints_with_barrier"] += 1
            text += "; " + barrier_text(b)
        if c["secondary_errs"] or c["primary_errs"]:
            facts["checkpoint_guest_errors"] += 1
            text += (f"; GUEST READ-BACK ERRORS primary {c['primary_errs']}, secondary "
                     f"{c['secondary_errs']} (first at counter {c['secondary_state']['first_err_counter']})")
        lines.append((c["t_stop"], text))
    facts["checkpoints"] = len(cks)
    first_ck = cks[0]["t_stop"] if cks else float("inf")
    for n, e in sorted(barriers.items()):
        if n not in used:
            what = "initial checkpoint (COLO entry)" if e["ts"] < first_ck else "extra checkpoint"
            lines.append((e["ts"], f"{what}: {barrier_text(n)}"))

    r, t = dline("killed primary pid")
    if at(r):
        m = re.search(r"counter was ~(\d+)", t)
        lines.append((at(r), "PRIMARY HOST FAILURE: primary QEMU killed (kill -9)"
                             + (f", its guest at counter ~{m.group(1)}" if m else "")))
    try:  # colo-pair.sh --kill-primary-blk notes when it killed the primary colo-blk
        lines.append((float(open(os.path.join(w, "p.blk.killed")).read()),
                      "primary colo-blk killed too (kill -9), before the failover"))
    except (OSError, ValueError):
        pass
    r, t = dline("secondary COLO_EXIT")
    if at(r):
        lines.append((at(r), f"secondary QEMU: COLO_EXIT {res.get('colo_exit_after_kill_ms', '?')} ms "
                             "after the kill"))
    r, t = dline("secondary frozen at failover point")
    fr = res.get("secondary_resumed_with")
    if at(r) and fr:
        lines.append((at(r), f"secondary VM frozen at counter {fr['counter']} "
                             "(last checkpoint + its own writes since): the state it resumes with"))
    for e in events(ev, "s", "COLO_BARRIER_DISCARDED"):
        lines.append((e["ts"], f"secondary colo-blk: pending barrier {e['data']['barrier']} discarded"))
    fo = [e for e in events(ev, "s", "REPLICATION_STAGE") if e["data"].get("stage") == "failover"]
    if fo:
        lines.append((fo[0]["ts"], "failover requested: secondary colo-blk replication-stop "
                                   "failover=true (stage running -> failover)"))
    q = load_json(os.path.join(w, "s.replication.json"), {})
    facts["survivor_stage"] = q.get("stage")
    colo = q.get("colo", {})
    facts["commits"] = colo.get("commits", 0)
    facts["barriers"] = colo.get("barriers", 0)
    lc = colo.get("last-commit") or {}
    if q:
        fd = events(ev, "s", "REPLICATION_FAILOVER_DONE")
        lines.append((fd[0]["ts"] + 1e-4 if fd else pair_end, f"secondary colo-blk after the failover: stage {q.get('stage')}, "
                              f"{facts['barriers']} barriers received, {facts['commits']} committed"
                              + (f", last commit: barrier {lc['barrier']} ({lc['trigger']}, "
                                 f"{lc['duration-us']} us)" if lc else "")))
    cm = q.get("commit", {})
    done = events(ev, "s", "REPLICATION_FAILOVER_DONE")
    if done:
        facts["merged"] = cm.get("done-bytes")
        dur = f", {(done[0]['ts'] - fo[0]['ts']) * 1000:.1f} ms" if fo else ""
        lines.append((done[0]["ts"], f"failover commit done: merged {cm.get('done-bytes', '?')} of "
                                     f"{cm.get('total-bytes', '?')} bytes (the secondary VM's writes buffered "
                                     f"since its last committed checkpoint) into the disk{dur}"))
    for e in events(ev, "s", "REPLICATION_STAGE"):
        if e["data"].get("stage") == "failover-failed":
            lines.append((e["ts"], "secondary colo-blk: FAILOVER FAILED"))
    r, t = dline("secondary status running")
    if at(r):
        lines.append((at(r), f"secondary VM running on its own disk ({res.get('failover_to_running_ms', '?')}"
                             " ms after x-colo-lost-heartbeat)"))
    r, t = dline("secondary final (stopped)")
    fin = res.get("secondary_final")
    if at(r) and fin:
        facts["final_errors"] = fin["err_count"]
        lines.append((at(r), f"survivor VM stopped: counter {fin['counter']}, last verified write "
                             f"{fin['last_completed']}, guest I/O errors {fin['err_count']}"))
    elif fin:
        facts["final_errors"] = fin["err_count"]
    for ts, text in sorted(lines, key=lambda x: x[0]):
        say(ts, text)
    with open(os.path.join(w, "facts.json"), "w") as f:
        json.dump(facts, f)


# -- wait-sync W SINCE TIMEOUT: survivor (primary role) in sync with the new one ------
def wait_sync(w, since, timeout):
    q = Qmp(os.path.join(w, "s.blk.qmp"), timeout=10)
    end = time.monotonic() + timeout
    while True:
        r = q.cmd("query-replication")
        ok = (r.get("mode") == "primary" and r.get("stage") == "running"
              and r["link"]["connected"] and r["link"]["inflight"] == 0
              and r["resync"]["remaining-bytes"] == 0 and r["dirty-bytes"] == 0)
        if ok or time.monotonic() > end:
            break
        time.sleep(0.02)
    q.close()
    ev = os.path.join(w, "events.jsonl")
    if not ok:
        say(time.time(), f"NOT in sync after {timeout} s: {json.dumps(r)}")
        return 1
    # the events were emitted before the state we just saw; give the watcher a moment
    end = time.monotonic() + 2
    while not events(ev, "s", "REPLICATION_IN_SYNC", since) and time.monotonic() < end:
        time.sleep(0.02)
    for e in events(ev, "s", "REPLICATION_LINK", since)[:1]:
        say(e["ts"], f"survivor colo-blk (now primary): link to the new secondary up")
    rs = r["resync"]
    ins = events(ev, "s", "REPLICATION_IN_SYNC", since)
    say(ins[0]["ts"] if ins else time.time(),
        f"full sync done: copied {rs['copied-bytes']} of {rs['total-bytes']} bytes "
        f"({mib(rs['total-bytes'])}); in sync (remaining 0, link connected, inflight 0)")
    with open(os.path.join(w, "sync.json"), "w") as f:
        json.dump(r, f)
    return 0


# -- barrier W: checkpoint barrier from the survivor, committed on the new secondary --
def barrier(w):
    s = Qmp(os.path.join(w, "s.blk.qmp"), timeout=40)
    n = Qmp(os.path.join(w, "n.blk.qmp"), timeout=40)
    try:
        s.cmd("replication-checkpoint")
        r = s.cmd("query-replication")
        b = r["barriers"]
        pend = n.cmd("query-replication")["colo"]["pending-barrier"]
        text = f"barrier {b['sent']} from the survivor confirmed in {b['last-us'] / 1000:.1f} ms"
        if pend is not None:
            n.cmd("replication-checkpoint", barrier=pend)
            lc = n.cmd("query-replication")["colo"]["last-commit"] or {}
            text += (f"; new secondary committed barrier {pend} ({lc.get('trigger')}, "
                     f"{lc.get('duration-us', 0) / 1000:.1f} ms)")
        else:
            text += f" (link colo-barriers {r['link']['colo-barriers']}, nothing pending on the new secondary)"
        say(time.time(), text)
        return 0 if pend is not None else 1
    finally:
        s.close()
        n.close()


# -- run-guest W MIN_ITER TIMEOUT: resume the survivor VM, let it run, stop it -----
def run_guest(w, min_iter, timeout):
    s = Qmp(os.path.join(w, "s.qmp"), timeout=20)
    b = Qmp(os.path.join(w, "s.blk.qmp"), timeout=10)
    try:
        before = b.cmd("query-replication")
        st0 = read_guest_state(s)
        s.cmd("cont")
        say(time.time(), f"survivor VM resumed (cont) at counter {st0['counter']}, mirrored to the new secondary")
        end = time.monotonic() + timeout
        while True:
            st = read_guest_state(s)
            if st["counter"] - st0["counter"] >= min_iter or time.monotonic() > end:
                break
            time.sleep(0.05)
        s.cmd("stop")
        st = read_guest_state(s)
        # the VM is stopped: wait (bounded) until colo-blk has nothing in flight either way
        end = time.monotonic() + 10
        while True:
            r = b.cmd("query-replication")
            blk = b.cmd("query-block")
            if (blk["inflight"] == 0 and r["link"]["inflight"] == 0 and r["dirty-bytes"] == 0) \
                    or time.monotonic() > end:
                break
            time.sleep(0.02)
        fops = r["forwarded-ops"] - before["forwarded-ops"]
        fbytes = r["forwarded-bytes"] - before["forwarded-bytes"]
        say(time.time(), f"survivor VM stopped at counter {st['counter']} "
                         f"({st['last_completed'] - st0['last_completed']} more verified writes, guest I/O errors "
                         f"{st['err_count']}); {fops} guest writes ({mib(fbytes)}) mirrored, "
                         f"link inflight {r['link']['inflight']}, dirty {r['dirty-bytes']}")
        with open(os.path.join(w, "final2_state.json"), "w") as f:
            json.dump(st, f)
        with open(os.path.join(w, "run2.json"), "w") as f:
            json.dump({"iterations": st["counter"] - st0["counter"], "errors": st["err_count"],
                       "forwarded_ops": fops, "forwarded_bytes": fbytes}, f)
        ok = st["err_count"] == 0 and st["counter"] - st0["counter"] >= min_iter and fops > 0
        return 0 if ok else 1
    finally:
        s.close()
        b.close()


def checktxt(path, out):
    """checkdisk.py's text output (as colo-pair.sh keeps it in check.txt) -> JSON."""
    d = {}
    try:
        for line in open(path):
            k, sep, v = line.strip().partition(": ")
            if sep:
                d[k] = v
    except OSError:
        pass
    with open(out, "w") as f:
        json.dump(d, f)
    return 0 if d.get("consistent") == "True" else 1


def get(path, keys):
    """Print the values at KEY.PATH... of a JSON file, one a line ("" if absent)."""
    doc = load_json(path)
    for key in keys:
        v = doc
        for k in key.split("."):
            v = v.get(k) if isinstance(v, dict) else None
        print("" if v is None else v)
    return 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "watch":
        watch(args[0], args[1:])
    elif cmd == "timeline":
        timeline(args[0], float(args[1]))
    elif cmd == "say":
        say(time.time(), " ".join(args))
    elif cmd == "wait-sync":
        sys.exit(wait_sync(args[0], float(args[1]), float(args[2])))
    elif cmd == "barrier":
        sys.exit(barrier(args[0]))
    elif cmd == "run-guest":
        sys.exit(run_guest(args[0], int(args[1]), float(args[2])))
    elif cmd == "checktxt":
        sys.exit(checktxt(args[0], args[1]))
    elif cmd == "get":
        sys.exit(get(args[0], args[1:]))
    else:
        sys.exit(f"demo.py: unknown command {cmd}")
PYEOF
export DEMO_CQ=$cq
helper() { python3 "$W/demo.py" "$@"; }
jget() { helper get "$@"; } # FILE KEY.PATH...: the values, one a line

echo "COLO demo with colo-blk ($COLOBLK), work directory $W"
echo "wall clock   since start  event"

# Every colo-blk event of the three daemons (primary, secondary = survivor, new
# secondary) goes to events.jsonl with its own timestamp.
python3 "$W/demo.py" watch "$W/events.jsonl" "p=$W/p.blk.qmp" "s=$W/s.blk.qmp" "n=$W/n.blk.qmp" &
OWN_PIDS+=($!)

# ---- 1+2: the COLO pair, the primary's death, the failover, the survivor check ---
PAIR=(--colo-blk "$COLOBLK" --workdir "$W" --checkpoints "$K" --delay "$DELAY_MS" --after "$AFTER"
      --keep --kill-primary-blk)
[[ -n $PORT ]] && PAIR+=(--port "$PORT")
[[ $NO_HOOK == 1 ]] && PAIR+=(--no-hook)
say "COLO pair starting: colo-blk secondary + primary (VM-stop hook), two QEMU 7.2 under KVM," \
    "$K checkpoints every ${DELAY_MS} ms (colo-pair.sh log: pair.log)"
# In the background and waited for, so that a signal to the demo cleans up at once.
"$cq/colo-pair.sh" "${PAIR[@]}" >pair.log 2>&1 &
pair_pid=$!
OWN_PIDS+=("$pair_pid")
pair_rc=0
wait "$pair_pid" || pair_rc=$?
pair_end=$(date +%s.%N)
helper timeline "$W" "$pair_end"

if [[ ! -f result.json ]]; then
    fail "colo-pair.sh did not get through the COLO run (exit $pair_rc, no result.json)"
    tail -15 pair.log | sed 's/^/    /'
    finish
fi
mapfile -t f < <(jget facts.json checkpoints checkpoints_with_barrier final_errors merged \
    checkpoint_guest_errors commits barriers survivor_stage)
n_ck=${f[0]} n_bar=${f[1]} final_errors=${f[2]} merged=${f[3]} ck_err=${f[4]}
[[ $n_ck == "$K" ]] || fail "only $n_ck of $K checkpoints happened"
[[ $n_bar == "$n_ck" ]] || fail "$((n_ck - n_bar)) of $n_ck checkpoints sent no barrier to the secondary colo-blk"
[[ $ck_err == 0 ]] || fail "the guest's read-back check failed around $ck_err checkpoints"
[[ $final_errors == 0 ]] || fail "the guest saw $final_errors I/O errors (its read-back check failed)"
[[ ${f[5]} == "${f[6]}" ]] ||
    fail "the secondary colo-blk left barriers uncommitted"
[[ -n $merged ]] || fail "no REPLICATION_FAILOVER_DONE event from the secondary colo-blk"
[[ ${f[7]} == "done" ]] || fail "the survivor colo-blk is not in stage done after the failover"

# The survivor's disk must be exactly "last checkpoint + the secondary VM's own writes":
# checkdisk against the stopped VM's RAM state, as colo-pair.sh ran it (check.txt).
ck_ok=0
helper checktxt check.txt check.json && ck_ok=1
mapfile -t c < <(jget check.json ram_last_completed records missing stale future_records corrupt)
if [[ $ck_ok == 1 && $pair_rc == 0 ]]; then
    say "survivor check PASS: s.img holds every verified write up to counter ${c[0]}" \
        "of the survivor VM (${c[1]} records; missing, stale, future, corrupt: none)"
else
    fail "survivor check: s.img does not match the survivor VM's state" \
        "(missing ${c[2]}, stale ${c[3]}, future ${c[4]}, corrupt ${c[5]};" \
        "colo-pair.sh exit $pair_rc, see check.txt)"
fi

# ---- 3: re-protect the survivor with a fresh secondary ---------------------------
size=$(stat -c %s s.img)
say "re-protection: new colo-blk secondary with an empty $((size / 1048576)) MiB disk (n.img)," \
    "NBD on $W/n.nbd.sock"
rm -f n.img n.active.img n.hidden.img
truncate -s "$size" n.img
RUST_LOG=${RUST_LOG:-info} "$COLOBLK" serve --socket "$W/n.vhost.sock" --qmp "$W/n.blk.qmp" --disk n.img \
    --num-queues 1 --replication secondary --active n.active.img --hidden n.hidden.img \
    --nbd-listen "unix:$W/n.nbd.sock" --nbd-export colo2 >n.blk.log 2>&1 &
OWN_PIDS+=($!)
wait_socket "$W/n.blk.qmp" 10 || { fail "the new secondary's control socket did not appear"; finish; }
for ((i = 0; i < 250; i++)); do # the watcher must see the new secondary's events
    grep -q '"src": "n", "event": "_connected"' events.jsonl && break
    sleep 0.02
done
ctl n replication-start mode=secondary >/dev/null || { fail "replication-start on the new secondary failed"; finish; }
reprot_t=$(date +%s.%N)
say "survivor colo-blk becomes a primary: replication-start mode=primary sync=full" \
    "secondary=nbd+unix:///colo2?socket=…/n.nbd.sock"
ctl s replication-start mode=primary "secondary=nbd+unix:///colo2?socket=$W/n.nbd.sock" sync=full >/dev/null ||
    { fail "replication-start mode=primary on the survivor failed"; finish; }

synced=0
if helper wait-sync "$W" "$reprot_t" 30; then
    synced=1
    copied=$(jget sync.json resync.copied-bytes)
else
    fail "the new secondary did not get in sync within 30 s"
fi

cmp_disks() { # LABEL
    if cmp -s s.img n.img; then
        say "cmp s.img n.img ($1): identical ($size bytes)"
        return 0
    fi
    fail "cmp s.img n.img ($1): they differ ($(cmp -l s.img n.img | wc -l) bytes)"
    return 1
}
mirrored=0
if [[ $synced == 1 ]]; then
    helper barrier "$W" || fail "barrier from the survivor to the new secondary did not arrive as a COLO barrier"
    cmp_disks "VM stopped, after the full sync" || true
    # The survivor VM runs on (500 iterations of its disk loop, about a second), mirrored
    # to the new secondary.
    if helper run-guest "$W" 500 10; then :; else
        fail "the survivor VM's second run failed (guest errors, too few iterations or no mirrored writes)"
    fi
    mirrored=$(jget run2.json forwarded_ops)
    helper barrier "$W" || fail "second barrier did not arrive as a COLO barrier"
    cmp_disks "VM stopped again, after mirroring its writes" || true
    if python3 "$cq/checkdisk.py" n.img --state final2_state.json --json >check2.json 2>&1; then
        mapfile -t c < <(jget check2.json ram_counter records)
        say "checkdisk n.img: the new secondary's disk matches the survivor VM's state" \
            "(counter ${c[0]}, ${c[1]} records)"
    else
        fail "checkdisk n.img: the new secondary's disk does not match the survivor VM's state"
    fi
fi

finish "$K checkpoint(s) with barriers, failover merged ${merged:-?} bytes, survivor disk =" \
    "last checkpoint + its own writes, re-protected with a $((${copied:-0} / 1048576)) MiB full sync" \
    "+ $mirrored mirrored guest writes, disks identical"
