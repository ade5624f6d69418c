//! `kata-snap run` against `runc run` of one busybox bundle, side by side, and where kata-snap's
//! time goes: see `benches::run_bench`. Also the last section of startup-bench.
//!
//!   cargo build --release --bin kata-snap && cargo run --release -p benches --bin run-bench
//!   ... --bin run-bench -- --jail     (and each round with the jail off: its cost)
//!   ... --bin run-bench -- --pool     (through a running pool; with --jail: a jailed pool and
//!                                      an unjailed one)

use std::path::PathBuf;

use anyhow::Result;
use benches::{kata_snap_binary, run_bench};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "kata-snap run vs runc run of one bundle, and where kata-snap's time goes")]
struct Args {
    /// Alternating rounds (each: kata-snap, runc, kata-snap --debug).
    #[arg(long, default_value_t = 21)]
    runs: usize,
    /// Also run kata-snap with its jail off (config `"jail": false`) in each round: the jail's
    /// cost side by side (the other kata-snap runs are jailed as root).
    #[arg(long)]
    jail: bool,
    /// Restore through a running pool (`kata-snap pool start`: pre-started, pre-loaded VMMs);
    /// with `--jail`, one pool jailed and one with the jail off, side by side.
    #[arg(long)]
    pool: bool,
    /// The kata-snap binary [default: next to this program].
    #[arg(long)]
    kata_snap: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = kata_snap_binary(args.kata_snap).map_err(anyhow::Error::msg)?;
    let work = tempfile::tempdir()?;
    println!("kata-snap {}; {}", bin.display(), run_bench::load());
    println!("host: {}", vmm::host::check_host().summary);
    run_bench::section(&bin, work.path(), args.runs, args.jail, args.pool)?;
    println!("after: {}", run_bench::load());
    Ok(())
}
