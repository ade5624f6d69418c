use super::*;

fn args(f: impl FnOnce(&mut UpdateArgs)) -> UpdateArgs {
    let mut a = UpdateArgs {
        id: "c1".into(),
        ..Default::default()
    };
    f(&mut a);
    a
}

fn parse(a: &UpdateArgs) -> Result<Resources> {
    resources(a, &mut std::io::empty())
}

#[test]
fn test_ram_in_bytes_as_go_units() {
    for (s, want) in [
        ("100", 100),
        ("100M", 100 << 20),
        ("100m", 100 << 20),
        ("64MiB", 64 << 20),
        ("64mb", 64 << 20),
        ("1.5g", 3 << 29),
        ("2 k", 2048),
        ("1t", 1 << 40),
        ("1P", 1 << 50),
        ("0", 0),
        ("1 ", 1),
    ] {
        assert_eq!(ram_in_bytes(s).unwrap(), want, "{s}");
    }
    for bad in [
        "", "M", "abc", "-1", "1.2.3", "1x", "1MBB", ".5", "5.", "1e3", "9999999P",
    ] {
        let e = ram_in_bytes(bad).expect_err(bad);
        assert_eq!(e.to_string(), format!("invalid size: '{bad}'"));
    }
}

#[test]
fn test_update_flags_as_runc() {
    let r = parse(&args(|a| {
        a.memory = Some("64M".into());
        a.memory_reservation = Some("32m".into());
        a.memory_swap = Some("-1".into());
        a.cpu_quota = Some("50000".into());
        a.cpu_period = Some("100000".into());
        a.cpu_share = Some("512".into());
        a.cpuset_cpus = Some("0-1".into());
        a.cpuset_mems = Some("0".into());
        a.pids_limit = Some("20".into());
    }))
    .unwrap();
    assert_eq!(
        r,
        Resources {
            memory_limit: Some(64 << 20),
            memory_reservation: Some(32 << 20),
            memory_swap: Some(-1),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            cpu_shares: Some(512),
            cpuset_cpus: Some("0-1".into()),
            cpuset_mems: Some("0".into()),
            pids_limit: Some(20),
        }
    );
    r.validate().unwrap();
    // runc: zero leaves a value as it is; a negative quota is unlimited.
    let r = parse(&args(|a| {
        a.memory = Some("0".into());
        a.pids_limit = Some("0".into());
        a.cpu_quota = Some("-5".into());
    }))
    .unwrap();
    assert_eq!(
        r,
        Resources {
            cpu_quota: Some(-1),
            ..Default::default()
        }
    );
    // Obsolete and meaningless flags are warned about, not applied.
    let r = parse(&args(|a| {
        a.kernel_memory = Some("10M".into());
        a.blkio_weight = Some("500".into());
    }))
    .unwrap();
    assert!(r.is_empty());
}

#[test]
fn test_update_bad_values_in_runc_words() {
    for (f, want) in [
        (
            args(|a| a.memory = Some("lots".into())),
            "invalid value for memory: invalid size: 'lots'",
        ),
        (
            args(|a| a.memory_swap = Some("-2".into())),
            "invalid value for memory-swap: invalid size: '-2'",
        ),
        (
            args(|a| a.cpu_period = Some("-1".into())),
            "invalid value for cpu-period: strconv.ParseUint: parsing \"-1\": invalid syntax",
        ),
        (
            args(|a| a.cpu_quota = Some("1.5".into())),
            "invalid value for cpu-quota: strconv.ParseInt: parsing \"1.5\": invalid syntax",
        ),
        (
            args(|a| a.l3_cache_schema = Some("L3:0=f".into())),
            "Intel RDT/CAT: l3 cache schema is not enabled",
        ),
        (
            args(|a| a.mem_bw_schema = Some("MB:0=50".into())),
            "Intel RDT/MBA: memory bandwidth schema is not enabled",
        ),
    ] {
        assert_eq!(parse(&f).unwrap_err().to_string(), want);
    }
    let e = parse(&args(|a| a.cpu_rt_runtime = Some("950000".into()))).unwrap_err();
    assert!(e.to_string().contains("realtime"), "{e}");
    // Values the protocol bounds are refused before anything is sent.
    let r = parse(&args(|a| a.pids_limit = Some("-7".into()))).unwrap();
    assert!(r.validate().unwrap_err().to_string().contains("pids limit"));
    let r = parse(&args(|a| a.cpuset_cpus = Some("0;1".into()))).unwrap();
    assert!(r.validate().is_err());
}

#[test]
fn test_resources_json_from_stdin_and_file() {
    let doc = br#"{"memory":{"limit":67108864,"reservation":0,"swap":134217728,"kernel":0},
        "cpu":{"shares":1024,"quota":20000,"period":0,"realtimeRuntime":0,"realtimePeriod":0,
        "cpus":"0","mems":""},"blockIO":{"weight":0},"pids":{"limit":20},"unified":{"x":"y"}}"#;
    // Flags are ignored with -r, as runc.
    let a = args(|a| {
        a.resources = Some("-".into());
        a.memory = Some("1G".into());
    });
    let r = resources(&a, &mut &doc[..]).unwrap();
    assert_eq!(
        r,
        Resources {
            memory_limit: Some(64 << 20),
            memory_swap: Some(128 << 20),
            cpu_shares: Some(1024),
            cpu_quota: Some(20_000),
            cpuset_cpus: Some("0".into()),
            pids_limit: Some(20),
            ..Default::default()
        }
    );
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.json");
    std::fs::write(&f, br#"{"cpu":{"period":250000}}"#).unwrap();
    let a = args(|a| a.resources = Some(f.display().to_string()));
    assert_eq!(
        parse(&a).unwrap(),
        Resources {
            cpu_period: Some(250_000),
            ..Default::default()
        }
    );
    // Bad JSON, a bad type, realtime values, a missing file, too large a document.
    for bad in [
        &b"{"[..],
        br#"{"memory":{"limit":"64M"}}"#,
        br#"{"cpu":{"realtimeRuntime":1000}}"#,
    ] {
        let a = args(|a| a.resources = Some("-".into()));
        assert!(resources(&a, &mut &bad[..]).is_err());
    }
    let a = args(|a| a.resources = Some(dir.path().join("none").display().to_string()));
    assert!(parse(&a).is_err());
    let big = vec![b' '; MAX_RESOURCES_JSON as usize + 10];
    let a = args(|a| a.resources = Some("-".into()));
    let e = resources(&a, &mut &big[..]).unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
}

#[test]
fn test_go_durations() {
    for (s, ms) in [
        ("5s", 5000),
        ("500ms", 500),
        ("1m30s", 90_000),
        ("1.5s", 1500),
        ("0", 0),
    ] {
        assert_eq!(
            parse_go_duration(s).unwrap(),
            Duration::from_millis(ms),
            "{s}"
        );
    }
    for bad in ["", "5", "s", "5x", "-1s", "1..5s"] {
        assert!(parse_go_duration(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn test_stats_event_in_runc_shape() {
    let mut s = ContainerStats::default();
    s.cpu.usage_usec = 1500;
    s.cpu.user_usec = 1000;
    s.cpu.system_usec = 500;
    s.memory.usage = 1 << 20;
    s.memory.limit = 64 << 20;
    s.memory.swap_usage = 4096;
    s.memory.swap_limit = 64 << 20;
    s.memory.raw = vec![("file".into(), 8192), ("anon".into(), 4096)];
    s.pids.current = 2;
    s.pids.limit = u64::MAX;
    let line = event_line("stats", "c1", Some(&s));
    assert!(!line.contains('\n'));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["type"], "stats");
    assert_eq!(v["id"], "c1");
    let d = &v["data"];
    assert_eq!(d["cpu"]["usage"]["total"], 1_500_000);
    assert_eq!(d["cpu"]["usage"]["kernel"], 500_000);
    assert_eq!(d["cpu"]["usage"]["user"], 1_000_000);
    assert_eq!(d["cpu"]["throttling"], serde_json::json!({}));
    assert_eq!(d["memory"]["usage"]["limit"], 64u64 << 20);
    assert_eq!(d["memory"]["usage"]["usage"], 1u64 << 20);
    assert_eq!(d["memory"]["usage"]["failcnt"], 0);
    // Swap as cgroup v1 counted it: memory + swap.
    assert_eq!(d["memory"]["swap"]["usage"], (1u64 << 20) + 4096);
    assert_eq!(d["memory"]["swap"]["limit"], 128u64 << 20);
    assert_eq!(d["memory"]["cache"], 8192);
    assert_eq!(d["memory"]["raw"]["anon"], 4096);
    assert_eq!(
        d["memory"]["kernel"],
        serde_json::json!({"limit": 0, "failcnt": 0})
    );
    // Unlimited pids read as no limit (omitted), as runc.
    assert_eq!(d["pids"], serde_json::json!({"current": 2}));
    assert_eq!(d["cpuset"]["sched_relax_domain_level"], 0);
    for k in ["blkio", "hugetlb", "intel_rdt"] {
        assert_eq!(d[k], serde_json::json!({}), "{k}");
    }
    assert!(d["network_interfaces"].is_null());
    s.memory.limit = u64::MAX;
    s.memory.swap_limit = u64::MAX;
    let v: serde_json::Value = serde_json::from_str(&event_line("stats", "c1", Some(&s))).unwrap();
    assert_eq!(v["data"]["memory"]["usage"]["limit"], u64::MAX);
    assert_eq!(v["data"]["memory"]["swap"]["limit"], u64::MAX);
    assert_eq!(event_line("oom", "c1", None), r#"{"type":"oom","id":"c1"}"#);
}
