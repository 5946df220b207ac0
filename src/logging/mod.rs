//! Logging set-up: `--log-level`, overridden by a valid `RUST_LOG`. An invalid `RUST_LOG`
//! is reported and ignored instead of silently filtering everything out.

pub mod limit;

use log::LevelFilter;

/// Crates whose log targets a bare `RUST_LOG` word may name.
const KNOWN_TARGETS: &[&str] =
    &["colo_blk", "vhost", "vhost_user_backend", "virtio_queue", "vm_memory", "rustls", "io_uring", "blkio"];

const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// Checks a `RUST_LOG` value: comma-separated `LEVEL`, `TARGET` or `TARGET=LEVEL` items,
/// where a bare `TARGET` must name one of colo-blk's crates (a typo such as `RUST_LOG=verbose`
/// would otherwise select a target that never logs and silence everything).
pub fn check_spec(spec: &str) -> Result<(), String> {
    let spec = spec.split_once('/').map_or(spec, |(d, _)| d);
    let is_level = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
    let is_target = |t: &str| {
        !t.is_empty()
            && t.split("::").all(|part| !part.is_empty() && part.chars().all(|c| c.is_alphanumeric() || c == '_'))
    };
    for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some((target, level)) => {
                if !is_target(target) || !is_level(level) {
                    return Err(format!("'{item}' is not TARGET=LEVEL"));
                }
            }
            None if is_level(item) => {}
            None if is_target(item) && KNOWN_TARGETS.iter().any(|k| item.split("::").next() == Some(*k)) => {}
            None => return Err(format!("'{item}' is neither a level ({}) nor a known target", LEVELS.join("|"))),
        }
    }
    Ok(())
}

/// Starts the logger at `level`, or with `RUST_LOG`'s filters when that is set and valid.
pub fn init(level: LevelFilter) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level).format_timestamp_millis();
    let mut rejected = None;
    if let Ok(spec) = std::env::var("RUST_LOG")
        && !spec.trim().is_empty()
    {
        match check_spec(&spec) {
            Ok(()) => {
                builder.parse_filters(&spec);
            }
            Err(why) => rejected = Some((spec, why)),
        }
    }
    builder.init();
    if let Some((spec, why)) = rejected {
        log::warn!("RUST_LOG={spec} ignored ({why}); logging at level {level}");
    }
}

/// An error and its causes, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::check_spec;

    #[test]
    fn accepts_levels_and_targets_and_refuses_typos() {
        for ok in ["debug", "info,colo_blk=trace", "colo_blk::vhost", "WARN", "rustls=off,debug", "colo_blk/regex"] {
            assert!(check_spec(ok).is_ok(), "{ok}");
        }
        for bad in ["verbose", "colo_blk=loud", "=debug", "debug,nonsense"] {
            assert!(check_spec(bad).is_err(), "{bad}");
        }
    }
}
