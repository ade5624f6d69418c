//! Measurement, not a check: the harness round trip for a trivial exec
//! (connect, Hello, Run `true`, Exited), median over 50 runs.
//!
//! `cargo test --release -p agent --test roundtrip -- --ignored --nocapture`

mod common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use agent_protocol::AgentClient;
use common::Agent;

#[test]
#[ignore = "measurement; run explicitly with --ignored --nocapture"]
fn test_measure_trivial_exec_round_trip_prints_median() {
    require_harness!();
    let agent = Agent::start();
    let mut samples = Vec::new();
    for i in 0..55 {
        let t = Instant::now();
        let s = UnixStream::connect(&agent.socket).unwrap();
        let mut c = AgentClient::handshake(s, Duration::from_secs(10)).unwrap();
        let o = c
            .run(
                agent.request(&["true"]),
                Some(Vec::new()),
                Duration::from_secs(10),
            )
            .unwrap();
        let dt = t.elapsed();
        assert_eq!(o.code, 0);
        if i >= 5 {
            samples.push(dt); // the first runs warm the page cache
        }
    }
    samples.sort();
    let log = agent.log();
    let timings: Vec<&str> = log.lines().filter(|l| l.contains("run timing")).collect();
    println!(
        "last agent-side timing: {}",
        timings.last().copied().unwrap_or("none")
    );
    let tail: Vec<&str> = log.lines().rev().take(8).collect();
    println!("{}", tail.join("\n"));
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "trivial exec round trip over {} runs: median {:.0} us, min {:.0} us, p90 {:.0} us, max {:.0} us",
        samples.len(),
        us(samples[samples.len() / 2]),
        us(samples[0]),
        us(samples[samples.len() * 9 / 10]),
        us(samples[samples.len() - 1]),
    );
}
