//! A 2-vCPU guest snapshotted at READY and restored: both vCPUs run afterwards (a task pinned to
//! each CPU runs there).

use crate::guest::*;

#[test]
fn test_two_vcpu_guest_restored_runs_on_both_vcpus() {
    let Some(art) = setup() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs_image(dir.path(), "rootfs", 16);
    let template = dir.path().join("template");
    let mut t = Guest::boot(
        &art,
        &BootOpts {
            vcpus: 2,
            slots: vec!["rootfs".into()],
            snapshot_on_ready: Some(template.clone()),
            vsock: Some(dir.path().join("template.vsock")),
            ..Default::default()
        },
    );
    let status = t.wait_exit(READY_TIMEOUT);
    t.check(
        status.success(),
        format!("template boot ended with {status}"),
    );

    for mode in ["eager", "uffd"] {
        let mut g = Guest::restore(
            &template,
            mode,
            &t.vsock,
            &["--disk-slot".into(), format!("rootfs={}", rootfs.display())],
        );
        let o = g.sh(
            "/dev/vda",
            "grep -c ^processor /proc/cpuinfo; \
             for cpu in 0 1; do taskset -c $cpu awk '{print $39}' /proc/self/stat; done",
            vec![],
        );
        g.check(o.code == 0, format!("{mode}: {o:?}"));
        assert_eq!(
            out(&o),
            "2\n0\n1\n",
            "{mode}: cpus, then where each pinned task ran"
        );
        g.stop();
    }
}
