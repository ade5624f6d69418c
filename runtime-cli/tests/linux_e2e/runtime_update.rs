//! runc's `update` and `events` beside runc: the limits land in the container's cgroup (read
//! from inside the container through its /sys/fs/cgroup mount) and bite (forks past
//! `--pids-limit` fail), `events --stats` prints runc's shape with the new limits, `events`
//! streams stats and ends when the container stops, a memory limit above the VM's memory is
//! refused in one line, and `checkpoint` is refused.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{Output, wait_deadline};
use crate::guest::*;
use crate::runtime::*;

/// Starts `bundle` as the detached container `id` (`create` + `start`), stdio to files.
fn start_detached(cmd: &dyn Fn() -> Command, dir: &Path, bundle: &Path, id: &str) {
    let mut c = cmd();
    let err = dir.join(format!("{id}.err"));
    c.args(["create", "--no-pivot", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join(format!("{id}.out"))).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = c.spawn().unwrap();
    let status = wait_deadline(&mut child, T).expect("create did not finish");
    assert!(
        status.success(),
        "create {id}: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    assert_eq!(run_it(cmd(), &["start", id]).code(), 0);
}

/// A cgroup file of the container, read from inside it: /proc/self/cgroup names its group
/// (`0::/kata/c0` in kata-snap's guest, `0::/` in runc's cgroup namespace).
fn read_cgroup_file(cmd: &dyn Fn() -> Command, id: &str, file: &str) -> Output {
    let script = format!("read l < /proc/self/cgroup; cat /sys/fs/cgroup${{l#0::}}/{file}");
    run_it(cmd(), &["exec", id, "sh", "-c", &script])
}

/// The keys of a JSON object, but `cache` (omitted when zero, as Go's omitempty does).
fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().filter(|k| *k != "cache").cloned().collect())
        .unwrap_or_default()
}

#[test]
fn test_update_and_events_stats_as_runc() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    subreaper();
    let b = bundle(dir.path(), "up", "sleep 600", false);
    let runtimes = runtimes(e, dir.path());
    let mut seen = Vec::new();
    for (name, cmd) in &runtimes {
        start_detached(cmd.as_ref(), dir.path(), &b, "u1");
        let t0 = std::time::Instant::now();
        let up = run_it(
            cmd(),
            &["update", "--memory", "64M", "--pids-limit", "20", "u1"],
        );
        measure(&format!("{name}_update"), ms_since(t0));
        if *name == "runc" && up.code() != 0 {
            println!("SKIPPED (runc part): runc update failed in this rig: {up:?}");
            run_it(cmd(), &["delete", "--force", "u1"]);
            continue;
        }
        assert_eq!(up.code(), 0, "{name} update: {up:?}");
        let mem = read_cgroup_file(cmd.as_ref(), "u1", "memory.max");
        let pids = read_cgroup_file(cmd.as_ref(), "u1", "pids.max");
        assert_eq!(mem.code(), 0, "{name}: {mem:?}");
        // The limit bites: forks past 20 processes fail.
        let forks = run_it(
            cmd(),
            &[
                "exec",
                "u1",
                "sh",
                "-c",
                "i=0; while [ $i -lt 30 ]; do sleep 5 & i=$((i+1)); done; wait; echo done",
            ],
        );
        let t0 = std::time::Instant::now();
        let stats = run_it(cmd(), &["events", "--stats", "u1"]);
        measure(&format!("{name}_events_stats"), ms_since(t0));
        assert_eq!(stats.code(), 0, "{name} events: {stats:?}");
        assert_eq!(stats.stdout.lines().count(), 1, "{name}: {stats:?}");
        let v: serde_json::Value = serde_json::from_str(&stats.stdout).unwrap();
        let d = &v["data"];
        assert_eq!(v["type"], "stats", "{name}");
        assert_eq!(v["id"], "u1", "{name}");
        assert_eq!(d["memory"]["usage"]["limit"], 64u64 << 20, "{name}: {v}");
        assert!(
            d["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0,
            "{name}: {v}"
        );
        assert_eq!(d["pids"]["limit"], 20, "{name}: {v}");
        assert!(
            d["pids"]["current"].as_u64().unwrap_or(0) >= 1,
            "{name}: {v}"
        );
        assert!(
            d["cpu"]["usage"]["total"].as_u64().unwrap_or(0) > 0,
            "{name}: {v}"
        );
        assert!(d["memory"]["raw"]["anon"].is_u64(), "{name}: {v}");
        if *name == "kata-snap" {
            // Above the VM's memory: one line naming both numbers.
            let big = run_it(cmd(), &["update", "--memory", "100G", "u1"]);
            assert_eq!(big.code(), 1, "{big:?}");
            assert_eq!(big.stderr.trim().lines().count(), 1, "{big:?}");
            assert!(
                big.stderr.contains("107374182400") && big.stderr.contains("MemTotal"),
                "{big:?}"
            );
            let ck = run_it(cmd(), &["checkpoint", "u1"]);
            assert_eq!(ck.code(), 1, "{ck:?}");
            assert!(
                ck.stderr.contains("checkpoint/restore is not supported"),
                "{ck:?}"
            );
            // `events` streams stats every interval and ends when the container stops.
            let mut ev = cmd();
            ev.args(["events", "--interval", "1s", "u1"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = ev.spawn().unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let first = lines.next().expect("no event").unwrap();
            let fv: serde_json::Value = serde_json::from_str(&first).unwrap();
            assert_eq!(fv["type"], "stats", "{first}");
            assert_eq!(fv["data"]["pids"]["limit"], 20, "{first}");
            assert_eq!(run_it(cmd(), &["kill", "u1", "KILL"]).code(), 0);
            let st = wait_deadline(&mut child, Duration::from_secs(60))
                .expect("events did not end with the container");
            assert!(st.success(), "events ended with {st:?}");
        }
        assert_eq!(run_it(cmd(), &["delete", "--force", "u1"]).code(), 0);
        let stopped_update = run_it(cmd(), &["update", "--pids-limit", "5", "u1"]);
        seen.push((
            name.to_string(),
            vec![
                mem.stdout.trim().to_owned(),
                pids.stdout.trim().to_owned(),
                forks.stderr.contains("fork").to_string(),
                keys(d).into_iter().collect::<Vec<_>>().join(","),
                keys(&d["memory"]).into_iter().collect::<Vec<_>>().join(","),
                keys(&d["memory"]["usage"])
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(","),
                keys(&d["cpu"]["usage"])
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(","),
                stopped_update.code().to_string(),
            ],
        ));
    }
    for (name, s) in &seen {
        assert_eq!(s[0], "67108864", "{name} memory.max");
        assert_eq!(s[1], "20", "{name} pids.max");
        assert_eq!(s[2], "true", "{name}: no fork failure past the pids limit");
    }
    if seen.len() == 2 {
        assert_eq!(seen[0].1, seen[1].1, "kata-snap vs runc");
    }
}
