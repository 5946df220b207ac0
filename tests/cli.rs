//! Command-line contract: bad input is refused with exit code 2 and changes nothing.

use std::process::Command;

fn run(args: &[&str], cwd: &std::path::Path) -> (Option<i32>, String) {
    // Under `timeout`: a case that wrongly starts serving fails (exit 124) instead of hanging.
    let out = Command::new("timeout")
        .arg("20")
        .arg(env!("CARGO_BIN_EXE_colo-blk"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_options_exit_2_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&[&str], &str)] = &[
        (&["serve", "--socket", "s", "--disk", "x.img"], "--disk"),
        (&["serve", "--socket", "s", "--disk", "x.img", "--size", "10Q"], "--size"),
        (&["serve", "--socket", "s", "--disk", "x.img", "--size", "1000"], "--size"),
        (
            &["serve", "--socket", "s", "--disk", "x.img", "--size", "1M", "--logical-block-size", "1000"],
            "--logical-block-size",
        ),
        (&["serve", "--socket", "s", "--disk", "x.img", "--size", "1M", "--num-queues", "0"], "--num-queues"),
        (&["serve", "--socket", "s", "--disk", "x.img", "--size", "1M", "--queue-size", "100"], "--queue-size"),
        (&["serve", "--socket", "s", "--disk", "x.img", "--size", "1M", "--bogus"], "--bogus"),
        (&["serve", "--socket", "s", "--disk", "x.img", "--size", "1M", "--secondary", "nbd://h:1/x"], "--secondary"),
        (
            &[
                "serve",
                "--socket",
                "s",
                "--disk",
                "x.img",
                "--size",
                "1M",
                "--replication",
                "primary",
                "--secondary",
                "ftp://x",
            ],
            "--secondary",
        ),
        (
            &["serve", "--socket", "s", "--disk", "x.img", "--size", "1M", "--replication", "primary", "--active", "a"],
            "--active",
        ),
        (
            &[
                "serve",
                "--socket",
                "s",
                "--disk",
                "x.img",
                "--size",
                "1M",
                "--replication",
                "primary",
                "--secondary-timeout",
                "0",
            ],
            "--secondary-timeout",
        ),
    ];
    for (args, needle) in cases {
        let (code, err) = run(args, d);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: error does not name {needle}: {err}");
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 0, "{args:?} created files");
    }
}
