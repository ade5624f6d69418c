//! SyncTime and Reseed after a restore. In harness mode the agent validates
//! and records the values but never touches the host clock or entropy pool.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::Agent;

#[test]
fn test_restore_sync_time_acked_and_would_be_applied() {
    require_harness!();
    let agent = Agent::start();
    let before = SystemTime::now();
    let mut c = agent.client();
    // An hour in the future: a real clock_settime would be visible.
    let target = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        + 3_600_000_000_000;
    c.sync_time(target).expect("SyncTime acked");
    let log = agent.log();
    assert!(
        log.contains("harness mode: would step CLOCK_REALTIME"),
        "{log}"
    );
    assert!(log.contains(&format!("realtime_ns={target}")), "{log}");
    // The host clock did not jump.
    let drift = SystemTime::now().duration_since(before).unwrap();
    assert!(drift.as_secs() < 60, "host clock moved by {drift:?}");
    // The connection still runs a process afterwards.
    let o = c
        .run(agent.request(&["true"]), Some(vec![]), common::RUN_DEADLINE)
        .unwrap();
    assert_eq!(o.code, 0);
}

#[test]
fn test_restore_reseed_acked_and_would_be_applied() {
    require_harness!();
    let agent = Agent::start();
    let mut c = agent.client();
    c.reseed(vec![0x5a; 64]).expect("Reseed acked");
    c.reseed(vec![0xa5; 512]).expect("Reseed acked");
    let log = agent.log();
    assert!(
        log.contains("would add entropy (RNDADDENTROPY) bytes=64"),
        "{log}"
    );
    assert!(
        log.contains("would add entropy (RNDADDENTROPY) bytes=512"),
        "{log}"
    );
}
