//! How containers start: the first one warms the template and records its working set, the next
//! ones restore it; 20 at once; through a running pool; and `kata-snap run` against `runc run`
//! with where kata-snap's time goes (`scripts/rig/rung4.sh runtime_start::test_bench`).

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::wait_deadline;
use crate::guest::*;
use crate::runtime::*;

#[test]
fn test_first_container_warms_the_template_and_the_next_restores_it() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let fresh = Env {
        data: dir.path().join("data"),
        config: e.config.clone(),
        dir: dir.path().to_owned(),
    };
    let b = bundle(dir.path(), "b", "echo warm", false);
    let mut logs = Vec::new();
    for i in 0..3 {
        let log = dir.path().join(format!("log{i}"));
        let mut c = ks_cmd(&fresh, &dir.path().join("ks"));
        c.arg("--log").arg(&log).arg("--debug");
        let t0 = Instant::now();
        let o = run_it(
            c,
            &["run", "--bundle", b.to_str().unwrap(), &format!("w{i}")],
        );
        measure(
            match i {
                0 => "run_template_warmed_first",
                1 => "run_template_restored_in_mmap-prefetch",
                _ => "run_template_restored_again",
            },
            ms_since(t0),
        );
        assert_eq!(o.stdout, "warm\n", "{o:?}");
        logs.push(fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(logs[0].contains("warming template"), "{}", logs[0]);
    assert!(!logs[1].contains("warming template"), "{}", logs[1]);
    // The first container on the template records its start-up working set; the next ones
    // prefetch it.
    assert!(
        logs[0].contains("recording the template's working set")
            && logs[0].contains("the template's working set is recorded"),
        "{}",
        logs[0]
    );
    // With a spare CPU the prefetch runs beside the vCPU; with one (the rig's L1) it would
    // compete with it, and plain mmap is used.
    let want = if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        "restore mode MmapPrefetch"
    } else {
        // The logrus line's message ends with its closing quote.
        "restore mode Mmap\""
    };
    assert!(logs[1].contains(want), "{want}: {}", logs[1]);
    assert!(logs[2].contains(want), "{want}: {}", logs[2]);
    let list = run_it(
        ks_cmd(&fresh, &dir.path().join("ks")),
        &["template", "list"],
    );
    assert_eq!(list.stdout.lines().count(), 2, "{list:?}");
    assert!(list.stdout.contains("recorded"), "{list:?}");
}

#[test]
fn test_twenty_containers_at_once() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let b = bundle(dir.path(), "many", "echo container $(hostname)", false);
    // Warm first, so that the 20 measure restores.
    let w = run_it(
        ks_cmd(e, &dir.path().join("ks")),
        &["run", "--bundle", b.to_str().unwrap(), "warm"],
    );
    assert_eq!(w.code(), 0, "{w:?}");
    let t0 = Instant::now();
    let children: Vec<_> = (0..20)
        .map(|i| {
            let mut c = ks_cmd(e, &dir.path().join("ks"));
            c.args(["run", "--bundle", b.to_str().unwrap(), &format!("m{i}")])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for (i, mut child) in children.into_iter().enumerate() {
        let status = wait_deadline(&mut child, T).expect("container did not finish");
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "m{i}: {status:?} {out:?} {err:?}");
        assert_eq!(out, "container kata-snap\n", "m{i}: {err}");
    }
    measure("20_kata-snap_run_at_once", ms_since(t0));
    let list = run_it(ks_cmd(e, &dir.path().join("ks")), &["list", "-q"]);
    assert_eq!(list.stdout, "", "containers left behind");
}

/// With a pool running (`kata-snap pool start`), containers restore in its pre-started VMMs
/// and behave as cold ones; a container whose supervisor is killed takes its pooled VM with it.
#[test]
fn test_containers_restore_in_a_running_pool() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let pool = dir.path().join("pool");
    let ks = || {
        let mut c = ks_cmd(e, &dir.path().join("ks"));
        c.env("KATA_SNAP_POOL_DIR", &pool);
        c
    };
    let b = bundle(dir.path(), "p", "echo pooled; cat /etc/hostname", false);
    // The template first (cold), so that the pool's shells match its shape.
    let w = run_it(ks(), &["run", "--bundle", b.to_str().unwrap(), "w"]);
    assert_eq!(w.stdout, "pooled\nimage\n", "{w:?}");
    let p = run_it(
        ks(),
        &[
            "pool",
            "start",
            "--size",
            "2",
            "--vcpus",
            "1",
            "--mem-mib",
            "256",
        ],
    );
    assert_eq!(p.code(), 0, "{p:?}");
    let end = Instant::now() + T;
    while fs::read_dir(pool.join("ready"))
        .map(|d| d.count())
        .unwrap_or(0)
        < 2
    {
        assert!(Instant::now() < end, "the pool never got ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 0..2 {
        let log = dir.path().join(format!("pool{i}.log"));
        let mut c = ks();
        c.arg("--log").arg(&log).arg("--debug");
        let t0 = Instant::now();
        let o = run_it(
            c,
            &["run", "--bundle", b.to_str().unwrap(), &format!("p{i}")],
        );
        measure("run_through_pool", ms_since(t0));
        assert_eq!(o.stdout, "pooled\nimage\n", "{o:?}");
        assert_eq!(o.code(), 0, "{o:?}");
        let text = fs::read_to_string(&log).unwrap();
        assert!(text.contains("restore path: pool"), "{text}");
    }
    // A pooled container whose supervisor dies of SIGKILL: its VMM goes too.
    let end = Instant::now() + T;
    while fs::read_dir(pool.join("ready"))
        .map(|d| d.count())
        .unwrap_or(0)
        < 1
    {
        assert!(Instant::now() < end, "the pool did not refill");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = dir.path().join("kill.log");
    let slow = bundle(dir.path(), "slow", "echo up; sleep 600", false);
    let out = dir.path().join("kill.out");
    let mut c = ks();
    c.arg("--log").arg(&log).arg("--debug");
    c.args(["run", "--bundle", slow.to_str().unwrap(), "k"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    while fs::read_to_string(&out).unwrap_or_default() != "up\n" {
        assert!(Instant::now() < end, "no output from the pooled container");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = fs::read_to_string(&log).unwrap();
    let vmm_pid: i32 = text
        .lines()
        .find_map(|l| l.split_once("pre-started VMM pid ").map(|(_, p)| p))
        .and_then(|p| {
            let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or_else(|| panic!("no pooled VMM in {text}"));
    child.kill().unwrap();
    child.wait().unwrap();
    let end = Instant::now() + T;
    while Path::new(&format!("/proc/{vmm_pid}")).exists()
        && !fs::read_to_string(format!("/proc/{vmm_pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            Instant::now() < end,
            "the pooled VMM {vmm_pid} outlived its killed supervisor"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(run_it(ks(), &["delete", "--force", "k"]).code(), 0);
    assert_eq!(run_it(ks(), &["pool", "stop"]).code(), 0);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() - 1) / 2]
}

/// `kata-snap run` against `runc run` of the same bundle, alternating, and where kata-snap's
/// time goes (the supervisor's `--debug` timing line). Emulated timings: the ratio is the figure.
#[test]
fn test_bench_run_against_runc() {
    let Some(art) = setup() else { return };
    if !runc_present() {
        return;
    }
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let b = bundle(dir.path(), "bench", "echo hi", false);
    // Warm the template and the image first.
    let w = run_it(
        ks_cmd(e, &dir.path().join("ks")),
        &["run", "--bundle", b.to_str().unwrap(), "w"],
    );
    assert_eq!(w.stdout, "hi\n", "{w:?}");
    let (mut ours, mut theirs, mut mapped) = (Vec::new(), Vec::new(), Vec::new());
    let other = if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        "mmap"
    } else {
        "mmap-prefetch"
    };
    let mut phases: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for i in 0..5 {
        let log = dir.path().join(format!("log{i}"));
        let mut c = ks_cmd(e, &dir.path().join("ks"));
        c.arg("--log").arg(&log).arg("--debug");
        let t0 = Instant::now();
        let o = run_it(
            c,
            &["run", "--bundle", b.to_str().unwrap(), &format!("k{i}")],
        );
        ours.push(ms_since(t0));
        assert_eq!(o.stdout, "hi\n", "{o:?}");
        // The other mapped mode than the default (mmap-prefetch with a spare CPU, mmap without).
        let t0 = Instant::now();
        let o = run_it(
            ks_cmd(e, &dir.path().join("ks")),
            &[
                "run",
                "--restore-mode",
                other,
                "--bundle",
                b.to_str().unwrap(),
                &format!("m{i}"),
            ],
        );
        mapped.push(ms_since(t0));
        assert_eq!(o.stdout, "hi\n", "{o:?}");
        let t0 = Instant::now();
        let o = run_it(
            runc_cmd(&dir.path().join("runc")),
            &[
                "run",
                "--no-pivot",
                "--bundle",
                b.to_str().unwrap(),
                &format!("r{i}"),
            ],
        );
        theirs.push(ms_since(t0));
        assert_eq!(o.stdout, "hi\n", "{o:?}");
        let text = fs::read_to_string(&log).unwrap();
        let line = text
            .lines()
            .find_map(|l| l.split_once("timing: ").map(|(_, t)| t.to_string()))
            .unwrap_or_else(|| panic!("no timing line in {text}"));
        // "supervisor 1.0, restore 12.1, ... ms (total 40.2 ms)"
        for part in line.split(" ms (total").next().unwrap().split(", ") {
            let (name, v) = part.rsplit_once(' ').unwrap();
            phases
                .entry(name.replace(' ', "_"))
                .or_default()
                .push(v.parse().unwrap());
        }
    }
    for (i, (k, r)) in ours.iter().zip(&theirs).enumerate() {
        println!("RIG-INFO bench run {i}: kata-snap {k:.0} ms, runc {r:.0} ms");
    }
    let (k, r) = (median(ours.clone()), median(theirs.clone()));
    for v in &ours {
        measure("bench_kata-snap_run", *v);
    }
    for v in &theirs {
        measure("bench_runc_run", *v);
    }
    for v in &mapped {
        measure(&format!("bench_kata-snap_run_{other}"), *v);
    }
    println!(
        "RIG-INFO kata-snap run, default mode / {other}: {:.2} ({k:.0} / {:.0} ms, emulated)",
        k / median(mapped.clone()),
        median(mapped.clone())
    );
    for (name, v) in &phases {
        for x in v {
            measure(&format!("bench_kata-snap_phase_{name}"), *x);
        }
    }
    println!(
        "RIG-INFO kata-snap run / runc run of one bundle: {:.2} (medians of 5 alternating runs: {k:.0} / {r:.0} ms, emulated)",
        k / r
    );
}
