//! `template` and `image`: the runtime's caches of VM templates and rootfs images.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use vmm::seccomp::SeccompMode;

use super::{assets, state, template};

/// `kata-snap template`.
#[derive(Debug, Args)]
pub struct TemplateArgs {
    #[command(subcommand)]
    pub command: TemplateCommand,
}

/// `kata-snap template` commands.
#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// List the templates: key, vCPUs, memory, disk use, warm time.
    List,
    /// Make the template for this shape now (first container starts then restore it at once).
    Warm {
        /// vCPUs [default: `defaultVcpus` of /etc/kata-snap/config.json, else 1].
        #[arg(long)]
        vcpus: Option<u8>,
        /// Memory in MiB [default: `defaultMemMib` of the config file, else 256].
        #[arg(long)]
        mem_mib: Option<u64>,
        /// The template of containers that join a network namespace (with a net slot).
        #[arg(long)]
        net: bool,
        /// The template of containers that bind host directories or files (with a virtio-fs
        /// slot for them).
        #[arg(long)]
        fs: bool,
    },
    /// Remove a template by key.
    Rm {
        /// The key `template list` prints.
        key: String,
    },
}

/// `kata-snap image`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub command: ImageCommand,
}

/// `kata-snap image` commands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List the cached rootfs images, least recently used first.
    List,
    /// Remove one image by key (a VM that has it open keeps reading it).
    Rm {
        /// The key `image list` prints.
        key: String,
    },
    /// Remove least recently used images until the cache holds at most --keep-mib, sparing
    /// those in use by a container and those used in the last --unused-for minutes. `create`
    /// prunes to `imageCacheMib` of the config file (default 10 GiB) after each build.
    Prune {
        /// Most MiB of images to keep.
        #[arg(long, value_name = "MIB", default_value_t = 0)]
        keep_mib: u64,
        /// Only remove images unused for this many minutes.
        #[arg(long, value_name = "MINUTES", default_value_t = 60)]
        unused_for: u64,
    },
}

pub(super) fn image_cmd(cmd: ImageCommand) -> Result<i32> {
    let dir = assets::data_dir().join("images");
    if !dir.is_dir() {
        if let ImageCommand::Rm { key } = &cmd {
            bail!("no image {key}: the image cache {} is empty", dir.display());
        }
        return Ok(0);
    }
    let cache = rootfs_image::ImageCache::open(&dir)?;
    match cmd {
        ImageCommand::List => {
            println!("{:<66}{:>10}  LAST USED", "KEY", "MIB");
            for i in cache.list()? {
                println!(
                    "{:<66}{:>10.1}  {}",
                    i.key,
                    i.size as f64 / 1048576.0,
                    state::rfc3339(i.last_used)
                );
            }
        }
        ImageCommand::Rm { key } => cache.remove(&key)?,
        ImageCommand::Prune {
            keep_mib,
            unused_for,
        } => {
            let r = cache.prune(
                keep_mib.saturating_mul(1 << 20),
                Duration::from_secs(unused_for.saturating_mul(60)),
            )?;
            println!(
                "removed {} images ({:.1} MiB); spared {} in use; the cache holds {:.1} MiB",
                r.removed.len(),
                r.freed as f64 / 1048576.0,
                r.in_use,
                r.total as f64 / 1048576.0
            );
        }
    }
    Ok(0)
}

pub(super) fn template_cmd(cmd: TemplateCommand, seccomp: SeccompMode) -> Result<i32> {
    let data = assets::data_dir();
    match cmd {
        TemplateCommand::List => {
            println!(
                "{:<34}{:>6}{:>9}{:>5}{:>4}{:>10}{:>10}  {:<11}CREATED",
                "KEY", "VCPUS", "MEM MIB", "NET", "FS", "DISK MIB", "WARM MS", "WORKINGSET"
            );
            for (m, bytes) in template::list(&data)? {
                let ws = template::workingset_path(&data.join("templates").join(&m.key)).is_file();
                println!(
                    "{:<34}{:>6}{:>9}{:>5}{:>4}{:>10.1}{:>10.0}  {:<11}{}",
                    m.key,
                    m.vcpus,
                    m.mem_mib,
                    if m.net { "yes" } else { "-" },
                    if m.fs { "yes" } else { "-" },
                    bytes as f64 / 1048576.0,
                    m.warm_ms,
                    if ws { "recorded" } else { "-" },
                    m.created
                );
            }
            Ok(0)
        }
        TemplateCommand::Warm {
            vcpus,
            mem_mib,
            net,
            fs,
        } => {
            let spec = template::spec_for(vcpus, mem_mib, net, fs)?;
            let t = template::ensure(&data, &spec, seccomp, &|m| eprintln!("kata-snap: {m}"))?;
            println!(
                "{} {} ({:.0} ms)",
                t.meta.key,
                if t.warmed { "warmed" } else { "already warm" },
                t.elapsed.as_secs_f64() * 1e3
            );
            Ok(0)
        }
        TemplateCommand::Rm { key } => {
            template::remove(&data, &key)?;
            Ok(0)
        }
    }
}
