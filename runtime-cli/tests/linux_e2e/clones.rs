//! 16 restores of one template at once, each running a process, all correct. Each clone has its
//! own host vsock socket (`kata-snap restore --vsock PATH`).

use crate::guest::*;
use crate::restore::make_template;

const CLONES: usize = 16;

#[test]
fn test_sixteen_clones_of_one_template_at_once() {
    let Some(art) = setup() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs_image(dir.path(), "rootfs", 16);
    let (template, _) = make_template(&art, dir.path());
    let clones: Vec<Guest> = (0..CLONES)
        .map(|i| {
            let vsock = dir.path().join(format!("clone{i}.vsock"));
            Guest::restore(
                &template,
                "uffd",
                &vsock,
                &["--disk-slot".into(), format!("rootfs={}", rootfs.display())],
            )
        })
        .collect();
    let results: Vec<(usize, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = clones
            .iter()
            .enumerate()
            .map(|(i, g)| {
                s.spawn(move || {
                    let mut c = g.agent();
                    c.sync_time(now_ns()).unwrap();
                    c.reseed(host_random()).unwrap();
                    let o = g.sh_on(
                        &mut c,
                        "/dev/vda",
                        &format!("echo clone {i}; od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'"),
                        vec![],
                    );
                    g.check(o.code == 0, format!("clone {i}: {o:?}"));
                    (i, out(&o))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut randoms = Vec::new();
    for (i, text) in &results {
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(format!("clone {i}").as_str()));
        randoms.push(lines.next().unwrap_or_default().to_owned());
    }
    randoms.sort();
    randoms.dedup();
    assert_eq!(randoms.len(), CLONES, "clones read the same random bytes");
    for mut g in clones {
        g.stop();
    }
}
