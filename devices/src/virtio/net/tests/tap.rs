//! The device on a real tap (root only): a frame the guest sends appears on the tap's
//! interface, and a frame sent out of that interface reaches the guest.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

/// A local experimental ethertype: the host's own traffic on the tap never uses it.
const ETHERTYPE: u16 = 0x88b5;

fn skip(reason: &str) -> bool {
    println!("SKIPPED: {reason}");
    true
}

fn eth_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Waits up to 5 s for a frame of our ethertype carrying `payload` on `fd`.
fn wait_packet(fd: &OwnedFd, payload: &[u8]) -> Option<Vec<u8>> {
    let end = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < end {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which we own.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let f = &buf[..n as usize];
        if f.len() >= 14 && f[12..14] == ETHERTYPE.to_be_bytes() && f[14..].starts_with(payload) {
            return Some(f.to_vec());
        }
    }
    None
}

#[test]
fn test_net_tap_frame_out_and_back() {
    if !nix::unistd::geteuid().is_root() {
        skip("needs root for a tap");
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        skip("no /dev/net/tun");
        return;
    }
    let name = format!("ksn-nt{}", std::process::id() % 100_000);
    let backend = match Backend::open_tap(&name) {
        Ok(b) => b,
        Err(e) => {
            skip(&format!("cannot create tap {name}: {e}"));
            return;
        }
    };
    let up = Command::new("ip")
        .args(["link", "set", "dev", &name, "up"])
        .status();
    if !up.is_ok_and(|s| s.success()) {
        skip("cannot bring the tap up with ip(8)");
        return;
    }
    let index = interface_index(&name);
    assert_ne!(index, 0);
    let sock = packet_socket(index, true);

    let mut g = NetGuest::with_backend(Some(backend), 0);
    g.run();
    assert_ne!(
        g.h.device
            .worker()
            .borrow()
            .handler
            .backend()
            .unwrap()
            .offload()
            & libc::TUN_F_CSUM,
        0,
        "the tap did not take the checksum offload"
    );
    g.post_rx(16, 2048);

    // Guest → tap.
    let out_payload = pattern(200, 11);
    let out = frame(&eth_frame([0xff; 6], MAC, &out_payload));
    g.send(&out, 2);
    let seen = wait_packet(&sock, &out_payload).expect("the guest's frame on the tap");
    assert_eq!(&seen[..], &out[VNET_HDR_LEN..]);
    assert_eq!(g.stats().tx_frames, 1);

    // Tap → guest.
    let back_payload = pattern(300, 12);
    let back = eth_frame(MAC, [0x02, 0, 0, 0, 0, 0x99], &back_payload);
    // SAFETY: send reads `back`, which we own, for its length.
    let n = unsafe { libc::send(sock.as_raw_fd(), back.as_ptr().cast(), back.len(), 0) };
    assert_eq!(
        n as usize,
        back.len(),
        "send: {}",
        std::io::Error::last_os_error()
    );
    let end = Instant::now() + Duration::from_secs(5);
    let mut found = false;
    while !found && Instant::now() < end {
        g.h.run_until_irq(Duration::from_millis(100));
        // The host also sends its own traffic (IPv6 router solicitations) into the tap.
        found = g
            .received()
            .iter()
            .any(|r| r.len() >= VNET_HDR_LEN + 14 && r[VNET_HDR_LEN..] == back[..]);
        g.post_rx(4, 2048);
    }
    assert!(found, "the frame sent on the tap did not reach the guest");
}
