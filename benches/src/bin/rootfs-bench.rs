//! The rootfs image cache on synthetic container rootfs trees of 10, 50 and 200 MB: the cost of
//! a miss (mkfs.erofs) against a hit keyed by tree signature and a hit keyed by overlay layers.
//! One table row per size, medians with the spread (min-max) over `--runs`.
//!
//!   cargo run --release -p benches --bin rootfs-bench [-- --runs 5 --drop-caches]
//!
//! Each hit is timed on a freshly opened cache, as a new `kata-snap run` process would see it.
//! The overlay column needs root (it mounts the tree as the lower layer of an overlay).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use rootfs_image::{ImageCache, KeyKind};

#[derive(Debug, Parser)]
#[command(
    about = "Benchmark the rootfs erofs image cache: build on a miss, hits by tree and overlay key"
)]
struct Args {
    /// Measurements per figure.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Rootfs sizes in MB.
    #[arg(long, value_delimiter = ',', default_value = "10,50,200")]
    sizes: Vec<u64>,
    /// Drop the page cache before each miss (needs root), so mkfs.erofs reads the tree from disk.
    #[arg(long)]
    drop_caches: bool,
    /// Where trees and caches are made [default: a temporary directory in /var/tmp].
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// SplitMix64: a fixed-seed generator, so every run builds the same trees.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What a synthetic tree holds.
#[derive(Debug, Default)]
struct TreeStats {
    files: u64,
    dirs: u64,
    symlinks: u64,
    bytes: u64,
}

/// Makes a rootfs-like tree of about `size` bytes in `root`: half the bytes in small files
/// (0.5-16 KiB) spread over nested directories, half in larger ones (100 KiB-4 MiB), and a
/// symlink for about every 40 files.
fn make_tree(root: &Path, size: u64, seed: u64) -> Result<TreeStats> {
    let mut rng = Rng(seed);
    let mut st = TreeStats::default();
    let mut dirs = vec![PathBuf::new()];
    let mut files: Vec<PathBuf> = Vec::new();
    fs::create_dir_all(root)?;
    let mut buf = vec![0u8; 4 << 20];
    let small_budget = size / 2;
    while st.bytes < size {
        let small = st.bytes < small_budget;
        // A new directory for about every 25 small files, at most 6 deep.
        if small && (dirs.len() == 1 || rng.range(0, 24) == 0) {
            let parent = dirs[rng.range(0, dirs.len() as u64 - 1) as usize].clone();
            let dir = if parent.components().count() >= 6 {
                PathBuf::from(format!("d{}", st.dirs))
            } else {
                parent.join(format!("d{}", st.dirs))
            };
            fs::create_dir_all(root.join(&dir))?;
            st.dirs += 1;
            dirs.push(dir);
        }
        let len = if small {
            rng.range(512, 16 << 10)
        } else {
            rng.range(100 << 10, 4 << 20)
        } as usize;
        let dir = &dirs[rng.range(0, dirs.len() as u64 - 1) as usize];
        let rel = dir.join(format!("f{}", st.files));
        rng.fill(&mut buf[..len]);
        fs::write(root.join(&rel), &buf[..len])?;
        st.files += 1;
        st.bytes += len as u64;
        files.push(rel);
        if rng.range(0, 39) == 0 {
            let target = &files[rng.range(0, files.len() as u64 - 1) as usize];
            let link = root.join(format!("link{}", st.symlinks));
            std::os::unix::fs::symlink(target, link)?;
            st.symlinks += 1;
        }
    }
    Ok(st)
}

fn drop_caches() -> Result<()> {
    ensure!(Command::new("sync").status()?.success(), "sync failed");
    fs::write("/proc/sys/vm/drop_caches", "3").context("drop caches (needs root)")
}

fn is_root() -> bool {
    // /proc/self belongs to this process's effective uid.
    fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// An overlay mount of one lower layer, unmounted on drop.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lower: &Path, base: &Path) -> Result<Self> {
        let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d)?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged)
            .output()?;
        if !out.status.success() {
            bail!("mount: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(Self(merged))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Median, min and max in milliseconds.
fn stats(v: &[Duration]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    Some((ms[ms.len() / 2], ms[0], ms[ms.len() - 1]))
}

fn cell(v: &[Duration]) -> String {
    match stats(v) {
        Some((med, min, max)) if med >= 100.0 => format!("{med:.0} ({min:.0}-{max:.0})"),
        Some((med, min, max)) if med >= 1.0 => format!("{med:.2} ({min:.2}-{max:.2})"),
        Some((med, min, max)) => format!("{med:.3} ({min:.3}-{max:.3})"),
        None => "n/a".into(),
    }
}

/// Times `runs` hits of `rootfs`, each on a freshly opened cache; checks they hit with `kind`.
fn time_hits(cache_dir: &Path, rootfs: &Path, kind: KeyKind, runs: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let cache = ImageCache::open(cache_dir)?;
        let t = Instant::now();
        let img = cache.get_or_build(rootfs)?;
        times.push(t.elapsed());
        ensure!(
            img.hit && img.key_kind == kind,
            "expected a {kind:?} hit, got {img:?}"
        );
    }
    Ok(times)
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.runs > 0, "--runs must be at least 1");
    let root = is_root();
    if args.drop_caches && !root {
        bail!("--drop-caches needs root");
    }
    let work = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir_in("/var/tmp")?,
    };
    println!(
        "rootfs image cache, {} runs per figure, page cache {} before misses; times in ms, median (min-max)",
        args.runs,
        if args.drop_caches { "dropped" } else { "warm" }
    );
    println!(
        "{:>6} | {:>18} | {:>22} | {:>22} | {:>22} | {:>9}",
        "size",
        "files/dirs/symlinks",
        "miss: build",
        "hit: tree signature",
        "hit: overlay key",
        "image MiB"
    );
    println!("{}", "-".repeat(116));
    for (i, &mb) in args.sizes.iter().enumerate() {
        let tree = work.path().join(format!("tree-{mb}"));
        let st = make_tree(&tree, mb * 1_000_000, 0x5eed_0000 + i as u64)?;

        let mut builds = Vec::new();
        let mut size = 0;
        let cache_dir = work.path().join(format!("cache-{mb}"));
        for run in 0..args.runs {
            if run > 0 {
                fs::remove_dir_all(&cache_dir)?;
            }
            if args.drop_caches {
                drop_caches()?;
            }
            let cache = ImageCache::open(&cache_dir)?;
            let img = cache.get_or_build(&tree)?;
            ensure!(!img.hit, "expected a miss");
            builds.push(img.build_time.expect("a miss builds"));
            size = img.size;
        }
        let tree_hits = time_hits(&cache_dir, &tree, KeyKind::TreeSignature, args.runs)?;

        let overlay_hits = if root {
            let base = work.path().join(format!("ovl-{mb}"));
            let ovl = Overlay::mount(&tree, &base)?;
            // The first use of the overlay key builds its image (not timed here).
            let first = ImageCache::open(&cache_dir)?.get_or_build(&ovl.0)?;
            ensure!(
                first.key_kind == KeyKind::Overlay,
                "overlay not keyed as such: {first:?}"
            );
            time_hits(&cache_dir, &ovl.0, KeyKind::Overlay, args.runs)?
        } else {
            Vec::new()
        };
        println!(
            "{:>4}MB | {:>18} | {:>22} | {:>22} | {:>22} | {:>9.1}",
            mb,
            format!("{}/{}/{}", st.files, st.dirs, st.symlinks),
            cell(&builds),
            cell(&tree_hits),
            cell(&overlay_hits),
            size as f64 / f64::from(1u32 << 20)
        );
        fs::remove_dir_all(&tree)?;
        fs::remove_dir_all(&cache_dir)?;
    }
    if !root {
        println!("overlay key: n/a (needs root to mount an overlay)");
    }
    Ok(())
}
