//! `kata-snap demo`: boots the built-in test guest and reports how fast it came up.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use vmm::{KernelImage, SerialOutput, VmConfig};

use crate::boot_cmd::{ms, timing_lines};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many times to boot the guest for the timing summary.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub runs: u32,
}

pub fn run(args: DemoArgs) -> Result<i32> {
    let guest = &test_guests::READY;
    println!(
        "kata-snap demo: booting the built-in test guest '{}' (serial output follows)",
        guest.name
    );
    println!("host: {}", vmm::vm::host_check().summary);
    let config = |serial| VmConfig {
        kernel: KernelImage::Builtin {
            name: guest.name,
            bytes: guest.elf,
        },
        initrd: None,
        cmdline: String::new(),
        mem_mib: 128,
        vcpus: 1,
        api_sock: None,
        serial,
        forward_stdin: false,
        snapshot_on_ready: None,
        process_start: Instant::now(),
    };
    let report = vmm::vm::run(config(SerialOutput::Stdout))?;
    println!("-- guest stopped: {}", report.reason);
    for line in timing_lines(&report) {
        println!("   {line}");
    }
    if report.reason.exit_code() != 0 {
        return Ok(report.reason.exit_code());
    }
    let runs = args.runs.max(1);
    let mut ready = Vec::new();
    let mut first = Vec::new();
    let mut started = Vec::new();
    for _ in 0..runs {
        let r = vmm::vm::run(config(SerialOutput::Sink))?;
        started.push(r.vcpus_started_after);
        first.extend(r.first_serial_byte_after);
        ready.extend(r.ready_after);
    }
    let median = |v: &mut Vec<std::time::Duration>| {
        v.sort();
        v.get(v.len() / 2)
            .copied()
            .map(ms)
            .unwrap_or_else(|| "-".into())
    };
    println!("-- {runs} more boots, in-process (VM set-up to milestone), median:");
    println!("   vCPUs running:     {}", median(&mut started));
    println!("   first serial byte: {}", median(&mut first));
    println!("   READY:             {}", median(&mut ready));
    Ok(0)
}
