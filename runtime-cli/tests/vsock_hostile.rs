//! A hostile guest against the vsock device, through KVM with the `vsock` test guest: a host
//! listener that never accepts must not freeze the VMM, and a connection flood must not use up its
//! file descriptors.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{BackgroundVm, kvm_usable};

/// The device's default cap on connections (`devices::virtio::vsock::DEFAULT_MAX_CONNECTIONS`).
const MAX_CONNECTIONS: usize = 256;

/// A listener at `path` with a backlog of 0 that nobody accepts from, and the connections that
/// fill its backlog (keep both alive).
fn full_backlog_listener(path: &Path) -> (UnixListener, Vec<UnixStream>) {
    use nix::errno::Errno;
    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(path).unwrap();
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    socket::bind(fd.as_raw_fd(), &addr).unwrap();
    socket::listen(&fd, Backlog::new(0).unwrap()).unwrap();
    let mut fill = Vec::new();
    loop {
        let c = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        match socket::connect(c.as_raw_fd(), &addr) {
            Ok(()) => fill.push(UnixStream::from(c)),
            Err(Errno::EAGAIN) => break,
            Err(e) => panic!("filling the backlog: {e}"),
        }
        assert!(fill.len() < 1024, "the backlog does not fill");
    }
    (UnixListener::from(fd), fill)
}

fn vsock_vm(dir: &Path, cmdline: &str) -> BackgroundVm {
    let spec = format!("3,{}", dir.join("v.sock").display());
    BackgroundVm::start("builtin:vsock", &["--vsock", &spec, "--cmdline", cmdline])
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn test_vsock_connect_to_listener_that_never_accepts_control_socket_answers_within_1s() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_listener, _fill) = full_backlog_listener(&dir.path().join("v.sock_5000"));
    let mut vm = vsock_vm(dir.path(), "port=5000 conns=1");
    vm.wait_for(
        || vm.serial_text().contains("vsock: sent 1\n"),
        Duration::from_secs(20),
        "the guest's connection request",
    );
    // The device is waiting for room in the listener's backlog: the loop must go on serving.
    for _ in 0..3 {
        let start = Instant::now();
        let out = vm.vm("status");
        assert_eq!(out.code(), 0, "{}", out.stderr);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "vm status took {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // After the connect timeout the guest is refused.
    vm.wait_for(
        || vm.serial_text().contains("vsock: responses=0 rst=1\n"),
        Duration::from_secs(20),
        "the RST",
    );
    assert_eq!(vm.vm("stop").code(), 0);
    vm.wait_exit(Duration::from_secs(20));
}

#[test]
fn test_vsock_guest_connection_flood_past_cap_gets_rst_and_fds_stay_bounded() {
    if !kvm_usable() {
        return;
    }
    // Baseline: the same VM with no connections.
    let dir = tempfile::tempdir().unwrap();
    let mut idle = vsock_vm(dir.path(), "port=5001 conns=0");
    idle.wait_for(
        || idle.serial_text().contains("vsock: responses=0 rst=0\n"),
        Duration::from_secs(20),
        "the idle guest",
    );
    let baseline = open_fds(idle.child.id());
    assert_eq!(idle.vm("stop").code(), 0);
    idle.wait_exit(Duration::from_secs(20));

    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_5001")).unwrap();
    listener.set_nonblocking(true).unwrap();
    let conns = MAX_CONNECTIONS + 344;
    let mut vm = vsock_vm(dir.path(), &format!("port=5001 conns={conns}"));
    let mut accepted = Vec::new();
    let report = format!(
        "vsock: responses={MAX_CONNECTIONS} rst={}\n",
        conns - MAX_CONNECTIONS
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vm.serial_text().contains(&report) {
        while let Ok((s, _)) = listener.accept() {
            accepted.push(s);
        }
        assert!(
            Instant::now() < deadline,
            "no {report:?}; serial: {}",
            vm.serial_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    while let Ok((s, _)) = listener.accept() {
        accepted.push(s);
    }
    assert_eq!(accepted.len(), MAX_CONNECTIONS);
    let fds = open_fds(vm.child.id());
    assert!(
        fds <= baseline + MAX_CONNECTIONS + 2,
        "{fds} fds open, baseline {baseline}"
    );
    let start = Instant::now();
    assert_eq!(vm.vm("status").code(), 0);
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(vm.vm("stop").code(), 0);
    vm.wait_exit(Duration::from_secs(20));
}
