//! `colo-blk ctl`: a QMP client for people. Prints the answer as pretty JSON (exit 0), or the
//! error text (exit 1); with `--wait` it then follows the long job the command started
//! (failover commit, resync, verify) and prints its progress until it ends.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use colo_blk::qmp::client::{self, QmpClient};
use serde_json::{Map, Value};

/// Arguments of `colo-blk ctl`.
#[derive(clap::Args)]
pub struct CtlArgs {
    /// The daemon's control socket.
    #[arg(long)]
    qmp: PathBuf,
    /// After the command, follow the failover commit, resync or verify it started, printing
    /// progress to stderr until it ends (exit 1 if it ends in an error).
    #[arg(long)]
    wait: bool,
    /// Command name, e.g. query-block.
    command: String,
    /// Arguments as KEY=VALUE (VALUE is parsed as JSON when it can be, else taken as a string).
    args: Vec<String>,
}

/// Runs the command; exit 0 on success, 1 on a QMP or connection error, 2 on bad arguments.
pub fn run(a: CtlArgs) -> ExitCode {
    let mut args = Map::new();
    for kv in &a.args {
        let Some((k, v)) = kv.split_once('=') else {
            eprintln!("colo-blk: argument '{kv}' is not KEY=VALUE");
            return ExitCode::from(2);
        };
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        args.insert(k.to_string(), value);
    }
    match client::execute(&a.qmp, &a.command, args) {
        Ok(Ok(ret)) => {
            // A closed stdout (`| head`) is not worth a panic.
            let _ = writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&ret).unwrap_or_default());
        }
        Ok(Err(desc)) => {
            eprintln!("error: {desc}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("colo-blk ctl: {e}");
            return ExitCode::from(1);
        }
    }
    if !a.wait {
        return ExitCode::SUCCESS;
    }
    match follow(&a.qmp, a.command == "replication-verify") {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("colo-blk ctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// A long job as `query-replication` shows it.
#[derive(Debug, PartialEq)]
enum Job {
    /// Failover commit: (done, total, progress object).
    Commit(u64, u64, Value),
    /// Resync / full sync: (copied, remaining, progress object).
    Resync(u64, u64, Value),
    /// `replication-verify`: (done, total, differing bytes, progress object).
    Verify(u64, u64, u64, Value),
    /// Nothing running; `ok`: the last job did not end in an error.
    Idle { ok: bool },
}

fn job_of(q: &Value) -> Job {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    if q["commit"]["active"] == true {
        return Job::Commit(
            n(&q["commit"]["done-bytes"]),
            n(&q["commit"]["total-bytes"]),
            q["commit"]["progress"].clone(),
        );
    }
    let v = &q["verify"];
    if v["active"] == true {
        return Job::Verify(n(&v["done-bytes"]), n(&v["total-bytes"]), n(&v["differing-bytes"]), v["progress"].clone());
    }
    let resync = &q["resync"];
    let remaining = n(&resync["remaining-bytes"]);
    if q["mode"] == "primary" && q["stage"] == "running" && (remaining > 0 || q["link"]["connected"] == false) {
        return Job::Resync(n(&resync["copied-bytes"]), remaining, resync["progress"].clone());
    }
    Job::Idle { ok: q["stage"] != "failover-failed" }
}

fn progress_line(what: &str, done: u64, left: u64, p: &Value) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    let total = done + left;
    let pct = if total > 0 { done as f64 * 100.0 / total as f64 } else { 100.0 };
    let rate = p["rate-bytes-per-s"].as_u64().map_or(String::new(), |r| format!(", {:.1} MiB/s", r as f64 / MIB));
    let eta = p["eta-s"].as_f64().map_or(String::new(), |e| format!(", ETA {e:.1} s"));
    format!("{what}: {:.1}/{:.1} MiB ({pct:.0}%){rate}{eta}", done as f64 / MIB, total as f64 / MIB)
}

/// Follows the job; `verify`: the command was `replication-verify`, whose outcome (its
/// `error`) decides the result, after the resync of what it found when it asked for one.
fn follow(qmp: &std::path::Path, verify: bool) -> std::io::Result<bool> {
    let mut c = QmpClient::connect(qmp)?;
    loop {
        let q = c.execute("query-replication", Map::new())?.map_err(std::io::Error::other)?;
        // A promoted secondary reports its failover in "previous".
        let job = match job_of(&q) {
            Job::Idle { .. } if q.get("previous").is_some() => match job_of(&q["previous"]) {
                j @ Job::Commit(..) => j,
                _ => job_of(&q),
            },
            j => j,
        };
        match job {
            Job::Commit(done, total, p) => {
                eprintln!("{}", progress_line("failover commit", done, total.saturating_sub(done), &p))
            }
            Job::Resync(copied, left, p) => {
                let what = if q["link"]["connected"] == true { "resync" } else { "resync (link down)" };
                eprintln!("{}", progress_line(what, copied, left, &p))
            }
            Job::Verify(done, total, differing, p) => {
                let what = format!("verify ({differing} bytes differ)");
                eprintln!("{}", progress_line(&what, done, total.saturating_sub(done), &p))
            }
            Job::Idle { ok } => {
                if verify {
                    let v = &q["verify"];
                    eprintln!(
                        "verify: {} bytes differ, {} unverified{}",
                        v["differing-bytes"],
                        v["unverified-bytes"],
                        v["error"].as_str().map_or(String::new(), |e| format!(", error: {e}"))
                    );
                    if v["error"].is_string() {
                        return Ok(false);
                    }
                }
                eprintln!(
                    "done: stage {}{}",
                    q["stage"],
                    q["error"].as_str().map_or(String::new(), |e| format!(", error: {e}"))
                );
                return Ok(ok);
            }
        }
        // Progress is polled: the daemon has no per-chunk event.
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recognises_jobs_and_formats_progress() {
        let q = json!({"mode": "secondary", "stage": "failover", "commit": {"active": true, "done-bytes": 1048576, "total-bytes": 4194304, "progress": {"rate-bytes-per-s": 2097152, "eta-s": 1.5}}});
        let Job::Commit(d, t, p) = job_of(&q) else { panic!("not a commit") };
        assert_eq!(
            progress_line("failover commit", d, t - d, &p),
            "failover commit: 1.0/4.0 MiB (25%), 2.0 MiB/s, ETA 1.5 s"
        );
        let q = json!({"mode": "primary", "stage": "running", "link": {"connected": true}, "resync": {"copied-bytes": 0, "remaining-bytes": 0}});
        assert_eq!(job_of(&q), Job::Idle { ok: true });
        let q = json!({"mode": "primary", "stage": "running", "link": {"connected": false}, "resync": {"copied-bytes": 5, "remaining-bytes": 7, "progress": null}});
        assert_eq!(job_of(&q), Job::Resync(5, 7, Value::Null));
        assert_eq!(
            job_of(&json!({"mode": "secondary", "stage": "failover-failed", "commit": {"active": false}})),
            Job::Idle { ok: false }
        );
        let q = json!({"mode": "primary", "stage": "running", "link": {"connected": true}, "resync": {"remaining-bytes": 9}, "verify": {"active": true, "done-bytes": 2, "total-bytes": 8, "differing-bytes": 4096, "progress": null}});
        assert_eq!(job_of(&q), Job::Verify(2, 8, 4096, Value::Null));
    }
}
