//! The `lb` binary end to end on loopback (L7 only: no root or XDP needed): flags become a
//! running tier, the admin socket changes it, bad flags are reported, SIGTERM cleans up.
use std::io::Read as _;
use std::process::{Command, Stdio};

mod support_lb;

use support_lb::{LB, Lb, Running, ScratchDir, Target, ready_line};

#[test]
fn flags_become_a_running_tier_that_the_admin_socket_changes() {
    let a = Target::start("alpha");
    let b = Target::start("beta");
    let mut lb = Lb::start(
        "admin",
        &[
            "--listener".into(),
            "web=http://127.0.0.1:0".into(),
            // Wiring only: health checks and draining have tests of their own.
            "--target-group".into(),
            "app,health-check=off,deregistration-delay=0".into(),
            "--target".into(),
            format!("app={}", a.addr),
            "--rule".into(),
            "web,priority=1,path=/private*,fixed-response=403,body=nope".into(),
            "--rule".into(),
            "web,default,forward=app".into(),
        ],
    );
    assert_eq!(lb.get("/"), (200, "alpha".into()));
    assert_eq!(lb.get("/private/x"), (403, "nope".into()));

    let out = lb.cli(&[
        "targets",
        "register",
        "--target",
        &format!("app={}", b.addr),
    ]);
    assert!(out.status.success(), "{out:?}");
    let seen: Vec<String> = (0..4).map(|_| lb.get("/").1).collect();
    assert_eq!(seen.iter().filter(|s| *s == "beta").count(), 2, "{seen:?}");

    let out = lb.cli(&[
        "targets",
        "deregister",
        "--target",
        &format!("app={}", a.addr),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!((0..4).all(|_| lb.get("/").1 == "beta"));

    let out = lb.cli(&["targets", "health"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let port = |addr: std::net::SocketAddr| format!(" {} ", addr.port());
    assert!(
        text.contains(&port(b.addr)) && !text.contains(&port(a.addr)),
        "{text}"
    );

    // Deregistering what is not there is an error the CLI reports.
    let out = lb.cli(&[
        "targets",
        "deregister",
        "--target",
        &format!("app={}", a.addr),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not registered"));

    let status = lb.terminate();
    assert!(status.success(), "lb exited with {status}");
    // Its directory is still there (removed when `lb` is dropped): only the socket went.
    assert!(lb.dir.exists(), "scratch directory gone early");
    assert!(!lb.admin.exists(), "admin socket left behind");
}

#[test]
fn bad_flags_are_all_reported_with_their_flag_and_exit_2() {
    let out = Command::new(LB)
        .args([
            "run",
            "--listener",
            "web=http://127.0.0.1:0",
            "--rule",
            "web,default,forward=missing",
            "--target",
            "ghost=127.0.0.1:1",
            "--ring-size",
            "10",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for flag in ["--rule", "--target", "--ring-size"] {
        assert!(err.contains(flag), "{flag} missing from:\n{err}");
    }
}

#[test]
fn check_validates_and_exits_without_serving() {
    let out = Command::new(LB)
        .args([
            "run",
            "--check",
            "--listener",
            "web=http://127.0.0.1:0",
            "--target-group",
            "app",
            "--rule",
            "web,default,fixed-response=200,body=ok",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
}

/// `lb run` with one listener on an ephemeral loopback port answering 200 itself (no target),
/// its admin socket in `dir`: the smallest running tier, for checks on the process.
fn fixed_response_lb_run(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(LB);
    cmd.args([
        "run",
        "--listener",
        "web=http://127.0.0.1:0",
        "--target-group",
        "app",
        "--rule",
        "web,default,fixed-response=200,body=ok",
        "--admin-socket",
    ])
    .arg(dir.join("admin.sock"));
    cmd
}

#[test]
fn lb_run_raises_its_open_files_soft_limit_to_the_hard_limit_and_says_so() {
    use std::os::unix::process::CommandExt as _;
    let dir = ScratchDir::new("rlimit");
    let mut cmd = fixed_response_lb_run(&dir);
    cmd.env("LB_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The common service default: soft 256 here (1,024 in the wild), hard 4,096.
    // SAFETY: setrlimit is async-signal-safe and only changes the child.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut lb = Running(cmd.spawn().expect("spawn lb"));
    let child = &mut lb.0;
    ready_line(child, None);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("limits");
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line")
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3..5],
        ["4096", "4096"],
        "soft and hard limit of the running lb: {limits}"
    );
    // SIGTERM right after `ready`: the handlers are installed before `ready` is printed, so
    // this is a clean stop, not a kill.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    let status = child.wait().expect("lb exits");
    assert!(
        status.success(),
        "SIGTERM right after ready: {status}\n{stderr}"
    );
    assert!(
        stderr.contains("open files limit raised from 256 to 4096"),
        "{stderr}"
    );
}

/// `THP_enabled` of a running `lb run` (`/proc/PID/status`: 0 once the process has asked for
/// no transparent huge pages), started with `env` added.
fn thp_enabled_of_lb_run(name: &str, env: &[(&str, &str)]) -> String {
    let dir = ScratchDir::new(name);
    let mut lb = Running(
        fixed_response_lb_run(&dir)
            .env_remove("MIMALLOC_ALLOW_THP")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lb"),
    );
    ready_line(&mut lb.0, None);
    let status = std::fs::read_to_string(format!("/proc/{}/status", lb.0.id()));
    drop(lb);
    status
        .expect("status of the running lb")
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .expect("a THP_enabled line (kernel 5.0 or later, with THP built in)")
        .trim()
        .to_string()
}

/// `lb` asks for normal pages for its heap (mimalloc's arena would be mapped 2 MiB at a
/// time, counting a 2–4 MB heap as 9–15 MB resident), unless `MIMALLOC_ALLOW_THP` is set,
/// which leaves the choice to mimalloc: the positive control.
#[test]
fn lb_run_turns_transparent_huge_pages_off_unless_mimalloc_allow_thp_is_set() {
    assert_eq!(thp_enabled_of_lb_run("thp-default", &[]), "0");
    assert_eq!(
        thp_enabled_of_lb_run("thp-allowed", &[("MIMALLOC_ALLOW_THP", "1")]),
        "1"
    );
}
