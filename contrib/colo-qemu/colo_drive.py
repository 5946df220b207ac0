#!/usr/bin/env python3
"""Drive a QEMU 7.2 COLO pair over QMP: start COLO, wait for checkpoints,
kill the primary, fail over to the secondary, watch it run, stop it.

Called by colo-pair.sh once both QEMUs are up; stdlib only.

    colo_drive.py --pqmp P.qmp --sqmp S.qmp --ppid PID --port PORT
                  [--checkpoints K] [--delay MS] [--after SEC] [--out result.json]

Steps (every wait has a timeout; events are awaited, not slept for):
  1. both: migrate-set-capabilities x-colo + events; primary: x-checkpoint-delay
  2. primary: migrate tcp:127.0.0.1:PORT; wait MIGRATION status=colo on both
  3. wait K checkpoints = K MIGRATION_PASS events on the primary; after each
     one wait for the secondary's RESUME and sample the guest state on both
  4. kill -9 the primary; wait COLO_EXIT on the secondary
  5. secondary: `stop` (freezes the guest at the failover point), read the
     guest state = "resumed-with" state, x-colo-lost-heartbeat, wait
     MIGRATION completed; `cont` if QEMU did not restart the guest itself
  6. sample the state every second for --after seconds, then `stop` and read
     the final state
The result (timings, samples, states) is written as JSON to --out and a
summary is printed.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp import Qmp, QmpError, QmpTimeout, event_time, read_guest_state  # noqa: E402

T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:8.3f}] {msg}", file=sys.stderr, flush=True)


def status_is(value):
    return lambda e: e.get("data", {}).get("status") == value


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--pqmp", required=True)
    ap.add_argument("--sqmp", required=True)
    ap.add_argument("--ppid", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--checkpoints", type=int, default=5)
    ap.add_argument("--delay", type=int, default=1000, help="x-checkpoint-delay, ms")
    ap.add_argument("--after", type=float, default=5.0, help="seconds to run after failover")
    ap.add_argument("--freeze", type=int, default=1,
                    help="1: stop the secondary before x-colo-lost-heartbeat to read the resume point")
    ap.add_argument("--on-freeze", help="shell command run while the secondary is frozen "
                    "at the failover point (e.g. copy its disk image)")
    ap.add_argument("--out")
    a = ap.parse_args(argv[1:])

    res = {"checkpoints": [], "after_failover": []}
    ck_timeout = a.delay / 1000.0 * 3 + 30

    p = Qmp(a.pqmp, timeout=20, log=lambda m: log("P " + m))
    s = Qmp(a.sqmp, timeout=20, log=lambda m: log("S " + m))
    caps = [{"capability": "x-colo", "state": True},
            {"capability": "events", "state": True}]
    s.cmd("migrate-set-capabilities", capabilities=caps)
    p.cmd("migrate-set-capabilities", capabilities=caps)
    p.cmd("migrate-set-parameters", **{"x-checkpoint-delay": a.delay})
    res["primary_state_before_migrate"] = read_guest_state(p)
    log(f"primary guest before migrate: {res['primary_state_before_migrate']}")

    t_mig = time.monotonic()
    p.cmd("migrate", uri=f"tcp:127.0.0.1:{a.port}")
    p.wait_event("MIGRATION", status_is("colo"), timeout=120)
    s.wait_event("MIGRATION", status_is("colo"), timeout=30)
    res["colo_entered_after_s"] = round(time.monotonic() - t_mig, 3)
    log(f"COLO established after {res['colo_entered_after_s']} s")

    # 3. checkpoints.  Per checkpoint the primary emits STOP, MIGRATION_PASS,
    # RESUME; the secondary STOP, RESUME.  Event timestamps (host clock, same
    # for both QEMUs) order them, so stale events from the initial migration
    # never match.
    colo_ev = [e for e in p.all_events if e["event"] == "MIGRATION"
               and e["data"].get("status") == "colo"][-1]
    t_after = event_time(colo_ev)
    last = None
    for k in range(1, a.checkpoints + 1):
        later = lambda t: (lambda e: event_time(e) > t)
        p_stop = p.wait_event("STOP", later(t_after), timeout=ck_timeout)
        ev = p.wait_event("MIGRATION_PASS", later(event_time(p_stop) - 1e-6), timeout=ck_timeout)
        p_resume = p.wait_event("RESUME", later(event_time(ev) - 1e-6), timeout=ck_timeout)
        s_resume = s.wait_event("RESUME", later(event_time(p_stop)), timeout=ck_timeout)
        t_after = event_time(p_resume)
        sst = read_guest_state(s)
        pst = read_guest_state(p)
        ck = {
            "n": k,
            "pass": ev["data"]["pass"],
            "t_stop": event_time(p_stop),
            "primary_stop_to_resume_ms": round((event_time(p_resume) - event_time(p_stop)) * 1000, 1),
            "secondary_resume_before_primary_ms": round((event_time(p_resume) - event_time(s_resume)) * 1000, 1),
            "secondary_counter_after_resume": sst["counter"],
            "primary_counter_now": pst["counter"],
            "secondary_errs": sst["err_count"],
            "primary_errs": pst["err_count"],
            "secondary_state": sst,
            "primary_state": pst,
        }
        if last is not None:
            ck["interval_s"] = round(ck["t_stop"] - last, 3)
        last = ck["t_stop"]
        res["checkpoints"].append(ck)
        log(f"checkpoint {k}: " + json.dumps({x: y for x, y in ck.items()
                                               if not x.endswith("_state")}))
        if sst["err_count"] or pst["err_count"]:
            log(f"  guest errors! secondary {sst} primary {pst}")

    # 4. kill the primary
    pre_kill = read_guest_state(p)
    res["primary_state_just_before_kill"] = pre_kill
    os.kill(a.ppid, signal.SIGKILL)
    t_kill = time.monotonic()
    log(f"killed primary pid {a.ppid}; primary guest counter was ~{pre_kill['counter']}")
    p.close()
    try:
        ev = s.wait_event("COLO_EXIT", timeout=30)
        res["secondary_colo_exit"] = ev["data"]
        res["colo_exit_after_kill_ms"] = round((time.monotonic() - t_kill) * 1000, 1)
        log(f"secondary COLO_EXIT {ev['data']} after {res['colo_exit_after_kill_ms']} ms")
    except QmpTimeout:
        res["secondary_colo_exit"] = None
        log("no COLO_EXIT on the secondary within 30 s; failing over anyway")

    # 5. failover
    if a.freeze:
        s.cmd("stop")
        frozen = read_guest_state(s)
        res["secondary_resumed_with"] = frozen
        log(f"secondary frozen at failover point: {frozen}")
        if a.on_freeze:
            rc = subprocess.run(a.on_freeze, shell=True).returncode
            log(f"--on-freeze command exited {rc}")
    s.cmd("x-colo-lost-heartbeat")
    t_fo = time.monotonic()
    ev = s.wait_event("MIGRATION", status_is("completed"), timeout=30)
    log("secondary MIGRATION completed")
    st = s.cmd("query-status")
    if st["status"] != "running":
        # QEMU normally restarts the guest itself (process_incoming_migration_bh);
        # give it a moment to do so before resuming by hand.
        try:
            s.wait_event("RESUME", timeout=5)
        except QmpTimeout:
            log(f"secondary status {st['status']} after failover; sending cont")
            s.cmd("cont")
        st = s.cmd("query-status")
    res["secondary_status_after_failover"] = st["status"]
    res["failover_to_running_ms"] = round((time.monotonic() - t_fo) * 1000, 1)
    log(f"secondary status {st['status']} ({res['failover_to_running_ms']} ms after lost-heartbeat)")
    res["colo_status"] = s.cmd("query-colo-status")

    # 6. run
    end = time.monotonic() + a.after
    while time.monotonic() < end:
        s.poll_events(wait=1.0)
        sst = read_guest_state(s)
        res["after_failover"].append({"t": round(time.monotonic() - t_fo, 2),
                                      "counter": sst["counter"], "errs": sst["err_count"]})
        log(f"after failover: counter {sst['counter']} errs {sst['err_count']}")
    s.cmd("stop")
    final = read_guest_state(s)
    res["secondary_final"] = final
    log(f"secondary final (stopped): {final}")
    s.close()

    # summary
    ints = [c["interval_s"] for c in res["checkpoints"] if "interval_s" in c]
    dts = [c["primary_stop_to_resume_ms"] for c in res["checkpoints"]
           if c["primary_stop_to_resume_ms"] is not None]
    res["summary"] = {
        "checkpoints": len(res["checkpoints"]),
        "mean_checkpoint_interval_s": round(sum(ints) / len(ints), 3) if ints else None,
        "mean_primary_downtime_ms": round(sum(dts) / len(dts), 1) if dts else None,
        "secondary_counter_after_each_checkpoint": [c["secondary_counter_after_resume"]
                                                    for c in res["checkpoints"]],
        "resumed_with_counter": res.get("secondary_resumed_with", {}).get("counter"),
        "final_counter": final["counter"],
        "final_errors": final["err_count"],
    }
    if len(res["after_failover"]) >= 2:
        a0, a1 = res["after_failover"][0], res["after_failover"][-1]
        if a1["t"] > a0["t"]:
            res["summary"]["io_iterations_per_s_after_failover"] = round(
                (a1["counter"] - a0["counter"]) / (a1["t"] - a0["t"]), 1)
    print(json.dumps(res["summary"], indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except QmpError as e:
        log(f"FAILED: {e}")
        sys.exit(1)
