//! The packing tool gives the same bytes for the same input, twice.

use std::process::Command;

#[test]
fn test_mkinitramfs_same_input_same_bytes() {
    let dir = std::env::temp_dir().join(format!("mkinitramfs-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let agent = dir.join("agent");
    std::fs::write(&agent, b"\x7fELF pretend agent").unwrap();
    let mut outputs = Vec::new();
    for i in 0..2 {
        let out = dir.join(format!("out{i}.cpio"));
        let st = Command::new(env!("CARGO_BIN_EXE_mkinitramfs"))
            .arg("--agent")
            .arg(&agent)
            .arg("--output")
            .arg(&out)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .status()
            .unwrap();
        assert!(st.success());
        outputs.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(outputs[0], outputs[1]);
    // mtime 1700000000 = 0x6553F100 appears in the headers.
    assert!(outputs[0].windows(8).any(|w| w == b"6553F100"));
    let st = Command::new(env!("CARGO_BIN_EXE_mkinitramfs"))
        .arg("--agent")
        .arg(dir.join("missing"))
        .arg("--output")
        .arg(dir.join("x.cpio"))
        .status()
        .unwrap();
    assert!(!st.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_mkinitramfs_output_listed_by_gnu_cpio() {
    if Command::new("cpio").arg("--version").output().is_err() {
        println!("SKIPPED: GNU cpio not installed (apt-get install cpio)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("mkinitramfs-cpio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("agent"), vec![0xabu8; 5000]).unwrap();
    let out = dir.join("i.cpio");
    let st = Command::new(env!("CARGO_BIN_EXE_mkinitramfs"))
        .arg("--agent")
        .arg(dir.join("agent"))
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let listing = Command::new("sh")
        .arg("-c")
        .arg(format!("cpio -it --quiet < {}", out.display()))
        .output()
        .unwrap();
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let names = String::from_utf8(listing.stdout).unwrap();
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        [
            "dev",
            "dev/console",
            "dev/null",
            "init",
            "mnt",
            "proc",
            "root",
            "run",
            "sys",
            "tmp"
        ]
    );
    // Extracted /init is byte-identical to the input.
    let x = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && mkdir -p x && cd x && cpio -id --quiet init < ../i.cpio",
            dir.display()
        ))
        .status()
        .unwrap();
    assert!(x.success());
    assert_eq!(
        std::fs::read(dir.join("x/init")).unwrap(),
        vec![0xabu8; 5000]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
