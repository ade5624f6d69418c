//! OCI `process.capabilities`, `linux.maskedPaths` and `linux.readonlyPaths`
//! applied in the guest as runc applies them (runc's `mask.bats`).

mod common;

use agent_protocol::{Capabilities, User};
use common::{Agent, err, out};

/// runc's default capabilities: CAP_AUDIT_WRITE (29), CAP_KILL (5),
/// CAP_NET_BIND_SERVICE (10).
const RUNC_DEFAULT: u64 = (1 << 29) | (1 << 5) | (1 << 10);

fn caps(ambient: bool, inheritable: bool) -> Capabilities {
    Capabilities {
        bounding: RUNC_DEFAULT,
        effective: RUNC_DEFAULT,
        permitted: RUNC_DEFAULT,
        inheritable: if inheritable { RUNC_DEFAULT } else { 0 },
        ambient: if ambient { RUNC_DEFAULT } else { 0 },
    }
}

/// The `Cap*` lines of /proc/self/status as (name, mask).
fn cap_lines(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let k = k.trim();
            k.starts_with("Cap")
                .then(|| (k.to_owned(), u64::from_str_radix(v.trim(), 16).unwrap()))
        })
        .collect()
}

fn status_caps(agent: &Agent, uid: u32, c: Option<Capabilities>) -> Vec<(String, u64)> {
    let mut req = agent.request(&["grep", "Cap", "/proc/self/status"]);
    req.process.user = User {
        uid,
        gid: uid,
        additional_gids: vec![],
    };
    req.process.capabilities = c;
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 0, "{}", err(&o));
    cap_lines(&out(&o))
}

fn expect(inh: u64, prm: u64, eff: u64, bnd: u64, amb: u64) -> Vec<(String, u64)> {
    [
        ("CapInh", inh),
        ("CapPrm", prm),
        ("CapEff", eff),
        ("CapBnd", bnd),
        ("CapAmb", amb),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec()
}

#[test]
fn test_caps_root_gets_runc_default_sets() {
    require_harness!();
    let agent = Agent::start();
    let got = status_caps(&agent, 0, Some(caps(false, false)));
    assert_eq!(
        got,
        expect(0, RUNC_DEFAULT, RUNC_DEFAULT, RUNC_DEFAULT, 0),
        "{}",
        agent.log()
    );
}

#[test]
fn test_caps_none_leaves_the_agents_capabilities() {
    require_harness!();
    let agent = Agent::start();
    let got = status_caps(&agent, 0, None);
    let bnd = got.iter().find(|(k, _)| k == "CapBnd").unwrap().1;
    // Everything the agent has, which is more than runc's default (CAP_SYS_ADMIN, 21).
    assert_ne!(bnd & (1 << 21), 0, "{got:?}");
}

#[test]
fn test_caps_user_with_ambient_keeps_them_across_exec() {
    require_harness!();
    let agent = Agent::start();
    let got = status_caps(&agent, 1000, Some(caps(true, true)));
    assert_eq!(
        got,
        expect(
            RUNC_DEFAULT,
            RUNC_DEFAULT,
            RUNC_DEFAULT,
            RUNC_DEFAULT,
            RUNC_DEFAULT
        )
    );
    // Without ambient ones, a user's process execs with none (the kernel's rule).
    let got = status_caps(&agent, 1000, Some(caps(false, true)));
    assert_eq!(got, expect(RUNC_DEFAULT, 0, 0, RUNC_DEFAULT, 0));
}

#[test]
fn test_caps_apply_to_an_exec_too() {
    require_harness!();
    let agent = Agent::start();
    let _init = agent.start_init(&["sleep", "30"]);
    let mut req = agent.exec_request("caps", &["grep", "Cap", "/proc/self/status"]);
    req.process.capabilities = Some(caps(false, false));
    let o = agent.exec_req(req, None).unwrap();
    assert_eq!(o.code, 0, "{}", err(&o));
    assert_eq!(
        cap_lines(&out(&o)),
        expect(0, RUNC_DEFAULT, RUNC_DEFAULT, RUNC_DEFAULT, 0)
    );
}

#[test]
fn test_caps_default_umount_not_permitted() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["umount", "/proc"]);
    req.process.capabilities = Some(caps(false, false));
    let o = agent.run_req(req, None).unwrap();
    assert_ne!(o.code, 0);
    assert!(err(&o).contains("Operation not permitted"), "{}", err(&o));
}

/// The rootfs of runc's mask.bats: a file and a directory to mask, and one
/// to make read-only.
fn masked_agent() -> Agent {
    let agent = Agent::start();
    std::fs::write(agent.rootfs.join("testfile"), "secret\n").unwrap();
    std::fs::create_dir(agent.rootfs.join("testdir")).unwrap();
    std::fs::write(agent.rootfs.join("testdir/inside"), "hidden\n").unwrap();
    std::fs::create_dir(agent.rootfs.join("rodir")).unwrap();
    std::fs::write(agent.rootfs.join("rodir/f"), "ro\n").unwrap();
    agent
}

fn masked_request(agent: &Agent, script: &str) -> agent_protocol::RunRequest {
    let mut req = agent.request(&["sh", "-c", script]);
    req.masked_paths = vec![
        "/testfile".into(),
        "/testdir".into(),
        "/does/not/exist".into(),
    ];
    req.readonly_paths = vec!["/rodir".into(), "/proc/sys".into(), "/missing".into()];
    req.process.capabilities = Some(caps(false, false));
    req
}

#[test]
fn test_masked_file_reads_empty_and_cannot_be_removed() {
    require_harness!();
    let agent = masked_agent();
    let mut req = masked_request(&agent, "cat /testfile; echo end; rm -f /testfile");
    // As runc's default config (and mask.bats): a read-only root, so removing the masked
    // file's mount point fails with EROFS rather than EBUSY.
    req.rootfs.readonly = true;
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(out(&o), "end\n", "{}", agent.log());
    assert_ne!(o.code, 0);
    assert!(err(&o).contains("Read-only file system"), "{}", err(&o));
    // The image's file is untouched.
    assert_eq!(
        std::fs::read_to_string(agent.rootfs.join("testfile")).unwrap(),
        "secret\n"
    );
}

#[test]
fn test_masked_file_umount_not_permitted_with_default_caps() {
    require_harness!();
    let agent = masked_agent();
    let req = masked_request(&agent, "umount /testfile");
    let o = agent.run_req(req, None).unwrap();
    assert_ne!(o.code, 0);
    assert!(err(&o).contains("Operation not permitted"), "{}", err(&o));
}

#[test]
fn test_masked_dir_lists_empty_and_refuses_writes() {
    require_harness!();
    let agent = masked_agent();
    let req = masked_request(&agent, "ls -A /testdir; echo end; touch /testdir/new");
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(out(&o), "end\n", "{}", agent.log());
    assert_ne!(o.code, 0);
    assert!(err(&o).contains("Read-only file system"), "{}", err(&o));
}

#[test]
fn test_readonly_paths_refuse_writes_and_stay_readable() {
    require_harness!();
    let agent = masked_agent();
    let req = masked_request(
        &agent,
        "cat /rodir/f; echo x > /rodir/f || echo refused; \
         echo h > /proc/sys/kernel/hostname || echo refused; touch /tmp/ok && echo tmp",
    );
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 0, "{}", err(&o));
    assert_eq!(out(&o), "ro\nrefused\nrefused\ntmp\n", "{}", agent.log());
    let e = err(&o);
    assert_eq!(e.matches("Read-only file system").count(), 2, "{e}");
}

#[test]
fn test_masked_and_readonly_missing_paths_skipped() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["echo", "ran"]);
    req.masked_paths = vec!["/nope".into(), "/proc/nope".into()];
    req.readonly_paths = vec!["/nope/ro".into()];
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 0, "{}", err(&o));
    assert_eq!(out(&o), "ran\n");
}

#[test]
fn test_masked_path_through_symlink_resolved_inside_the_root() {
    require_harness!();
    let agent = Agent::start();
    // As runc's securejoin: an absolute link is the container's, never the agent's /etc.
    std::fs::create_dir_all(agent.rootfs.join("etc")).unwrap();
    std::fs::write(agent.rootfs.join("etc/secret"), "hidden\n").unwrap();
    std::os::unix::fs::symlink("/etc", agent.rootfs.join("link")).unwrap();
    let mut req = agent.request(&["sh", "-c", "echo [$(cat /etc/secret)]"]);
    req.masked_paths = vec!["/link/secret".into()];
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(out(&o).trim(), "[]");
}
