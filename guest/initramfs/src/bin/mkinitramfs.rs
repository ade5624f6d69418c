//! `mkinitramfs --agent PATH --output PATH`: packs the agent as `/init` into a
//! reproducible newc cpio archive.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Pack the kata-snap agent into an initramfs.
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    /// The static agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// Where to write the archive (written to a temporary file, then renamed).
    #[arg(long)]
    output: PathBuf,
    /// mtime of every entry; defaults to $SOURCE_DATE_EPOCH, else 0.
    #[arg(long)]
    mtime: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mtime = match cli.mtime {
        Some(m) => m,
        None => match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => v
                .parse()
                .context("SOURCE_DATE_EPOCH is not a 32-bit number")?,
            Err(_) => 0,
        },
    };
    let agent =
        std::fs::read(&cli.agent).with_context(|| format!("reading {}", cli.agent.display()))?;
    let archive = initramfs::guest_initramfs(agent)?;
    let tmp = cli.output.with_extension("tmp");
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    let n = archive.write(mtime, &mut f)?;
    f.into_inner().context("flushing")?.sync_all()?;
    std::fs::rename(&tmp, &cli.output)?;
    println!("{} ({n} bytes)", cli.output.display());
    Ok(())
}
