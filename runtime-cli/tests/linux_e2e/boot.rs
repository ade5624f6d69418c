//! Cold boot of the microVM kernel and the agent to READY, then `Hello` and container processes
//! in a rootfs image on a virtio-blk disk: stdout, stderr and exit codes.

use std::time::Instant;

use agent_protocol::ErrorKind;

use crate::guest::*;

#[test]
fn test_cold_boot_to_ready_then_processes_run_in_a_virtio_blk_rootfs() {
    let Some(art) = setup() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs_image(dir.path(), "rootfs", 16);
    let mut g = Guest::boot(
        &art,
        &BootOpts {
            disks: vec![format!("{},ro", rootfs.display())],
            ..Default::default()
        },
    );
    let ready = g.wait_ready(READY_TIMEOUT);
    measure("cold_boot_to_ready", ready);

    let t = Instant::now();
    let mut c = g.agent();
    measure("cold_ready_to_hello", ms_since(t));
    let o = g.sh_on(
        &mut c,
        "/dev/vda",
        "echo out; echo err >&2; cat /etc/hostname; exit 3",
        vec![],
    );
    g.check(o.error.is_none(), format!("agent error: {:?}", o.error));
    assert_eq!(out(&o), "out\nimage\n");
    assert_eq!(err(&o), "err\n");
    assert_eq!(o.code, 3);
    assert!(o.pid.is_some_and(|p| p > 1), "pid {:?}", o.pid);

    // A second connection, a second container on the same image; a command that is not there.
    let mut c = g.agent();
    let o = c
        .run(
            request("/dev/vda", &["no-such-command"], vec![]),
            None,
            RUN_DEADLINE,
        )
        .unwrap();
    assert_eq!(o.code, 127, "{o:?}");
    assert_eq!(o.error.as_ref().map(|e| e.0), Some(ErrorKind::ExecNotFound));

    // The kernel is the project's, and the process is PID 1 of its own PID namespace, as
    // under runc (the agent, the guest's PID 1, is outside it).
    let o = g.sh(
        "/dev/vda",
        "cat /proc/1/cmdline; echo; cat /proc/version",
        vec![],
    );
    assert_eq!(o.code, 0, "{}", err(&o));
    let text = out(&o);
    let mut argv = text.split('\0');
    assert_eq!(
        (argv.next(), argv.next()),
        (Some("sh"), Some("-c")),
        "{text}"
    );
    assert!(text.contains("Linux version"), "{text}");
    g.stop();
}
