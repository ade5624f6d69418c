//! Exit statuses and exec failures, as runc reports them.

mod common;

use agent_protocol::ErrorKind;
use common::{Agent, out};

#[test]
fn test_exec_true_exits_zero() {
    require_harness!();
    let agent = Agent::start();
    let o = agent.run(&["true"]);
    assert_eq!(o.code, 0);
    assert!(o.pid.is_some(), "no Started: {:?}", o.events);
    assert!(o.error.is_none());
}

#[test]
fn test_exec_false_exits_one() {
    require_harness!();
    let agent = Agent::start();
    assert_eq!(agent.run(&["false"]).code, 1);
}

#[test]
fn test_exec_exit_42_reported() {
    require_harness!();
    let agent = Agent::start();
    assert_eq!(agent.run(&["sh", "-c", "exit 42"]).code, 42);
}

/// The exit status of `args` run as an exec beside a `sleep` init: a process that is not its
/// namespace's pid 1 (which, as in runc's containers, no signal from inside can kill).
fn exec_code(args: &[&str]) -> i32 {
    let agent = Agent::start();
    let _init = agent.start_init(&["sleep", "300"]);
    agent
        .exec_req(agent.exec_request("x", args), None)
        .unwrap()
        .code
}

#[test]
fn test_exec_self_sigkill_reports_137() {
    require_harness!();
    assert_eq!(exec_code(&["sh", "-c", "kill -KILL $$"]), 137);
}

#[test]
fn test_exec_self_sigterm_reports_143() {
    require_harness!();
    assert_eq!(exec_code(&["sh", "-c", "kill -TERM $$"]), 143);
}

#[test]
fn test_init_is_pid_1_and_its_own_sigkill_does_not_end_it() {
    require_harness!();
    let agent = Agent::start();
    // As with runc: the init is pid 1 of its PID namespace, which the kernel shields from
    // signals sent from inside, even SIGKILL.
    assert_eq!(
        agent
            .run(&["sh", "-c", "test $$ = 1 || exit 3; kill -KILL $$; exit 7"])
            .code,
        7
    );
}

#[test]
fn test_exec_missing_command_127_with_runc_message() {
    require_harness!();
    let agent = Agent::start();
    let o = agent.run(&["no-such-command", "arg"]);
    assert_eq!(o.code, 127);
    let (kind, msg) = o.error.expect("an Error before Exited");
    assert_eq!(kind, ErrorKind::ExecNotFound);
    assert_eq!(
        msg,
        "exec: \"no-such-command\": executable file not found in $PATH"
    );
    assert!(o.pid.is_none());
}

#[test]
fn test_exec_missing_absolute_path_127() {
    require_harness!();
    let agent = Agent::start();
    let o = agent.run(&["/bin/nope"]);
    assert_eq!(o.code, 127);
    assert_eq!(
        o.error.unwrap().1,
        "exec: \"/bin/nope\": stat /bin/nope: no such file or directory"
    );
}

#[test]
fn test_exec_not_executable_126_permission_denied() {
    require_harness!();
    let agent = Agent::start();
    let o = agent.run(&["/etc/passwd"]);
    assert_eq!(o.code, 126);
    let (kind, msg) = o.error.unwrap();
    assert_eq!(kind, ErrorKind::ExecPermissionDenied);
    assert_eq!(msg, "exec: \"/etc/passwd\": permission denied");
}

#[test]
fn test_exec_bad_cwd_126_with_message() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["true"]);
    // Not a directory, and cannot become one (runc creates a missing cwd).
    req.process.cwd = "/etc/passwd/sub".into();
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 126);
    let (kind, msg) = o.error.unwrap();
    assert_eq!(kind, ErrorKind::ExecFailed);
    assert!(msg.contains("chdir to cwd (\"/etc/passwd/sub\")"), "{msg}");
}

#[test]
fn test_exec_agent_serves_next_connection_after_exit() {
    require_harness!();
    let agent = Agent::start();
    assert_eq!(agent.run(&["sh", "-c", "exit 3"]).code, 3);
    let o = agent.run(&["echo", "again"]);
    assert_eq!((o.code, out(&o).as_str()), (0, "again\n"));
}
