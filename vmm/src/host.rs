//! What this host's KVM can do: hardware virtualization, or the nested paravirtual KVM (PVM) that
//! runs guest code emulated and cannot boot an unmodified Linux guest at speed.

use serde::{Deserialize, Serialize};

/// How guest code runs on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Virtualization {
    /// Intel VT-x (`vmx`).
    HardwareVmx,
    /// AMD-V (`svm`).
    HardwareSvm,
    /// The nested paravirtual KVM module `kvm_pvm`: guest code is emulated.
    NestedParavirt,
    /// Neither: KVM is unusable or absent.
    None,
}

/// The host check's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCheck {
    /// How guest code runs.
    pub virtualization: Virtualization,
    /// Whether `/dev/kvm` exists and can be opened read-write.
    pub kvm_accessible: bool,
    /// Whether an unmodified Linux guest can boot at speed here.
    pub can_boot_linux: bool,
    /// One line for people.
    pub summary: String,
}

/// Decides from the CPU flags, the loaded modules and `/dev/kvm` access. Pure, for tests.
pub fn classify(cpu_flags: &str, pvm_module_loaded: bool, kvm_accessible: bool) -> HostCheck {
    let has = |flag: &str| cpu_flags.split_whitespace().any(|f| f == flag);
    let virtualization = if pvm_module_loaded {
        Virtualization::NestedParavirt
    } else if has("vmx") {
        Virtualization::HardwareVmx
    } else if has("svm") {
        Virtualization::HardwareSvm
    } else {
        Virtualization::None
    };
    let hardware = matches!(
        virtualization,
        Virtualization::HardwareVmx | Virtualization::HardwareSvm
    );
    let can_boot_linux = hardware && kvm_accessible;
    let summary = match (virtualization, kvm_accessible) {
        (_, false) => "KVM is not usable: /dev/kvm is missing or not accessible".to_string(),
        (Virtualization::NestedParavirt, true) => "KVM is the nested paravirtual kvm_pvm without VT-x/AMD-V: guest code is emulated (about 1 M instructions/s); a Linux guest cannot boot at speed here".to_string(),
        (Virtualization::None, true) => "KVM is present but the CPU shows neither vmx nor svm: a Linux guest cannot boot at speed here".to_string(),
        (v, true) => format!("hardware virtualization ({}) with KVM: Linux guests run at full speed", if v == Virtualization::HardwareVmx { "VT-x" } else { "AMD-V" }),
    };
    HostCheck {
        virtualization,
        kvm_accessible,
        can_boot_linux,
        summary,
    }
}

/// Checks this host.
pub fn check_host() -> HostCheck {
    let kvm_accessible = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    check_host_with_kvm(kvm_accessible)
}

/// Checks this host, given whether `/dev/kvm` opens read-write (known to a caller that has it
/// open, which need not open it again).
pub fn check_host_with_kvm(kvm_accessible: bool) -> HostCheck {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.to_string())
        .unwrap_or_default();
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    classify(&flags, pvm, kvm_accessible)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_classify_hardware_and_pvm_hosts() {
        let c = classify("fpu vme vmx sse", false, true);
        assert_eq!(c.virtualization, Virtualization::HardwareVmx);
        assert!(c.can_boot_linux);
        let c = classify("fpu svm", false, true);
        assert_eq!(c.virtualization, Virtualization::HardwareSvm);
        assert!(c.can_boot_linux);
        let c = classify("fpu hypervisor", true, true);
        assert_eq!(c.virtualization, Virtualization::NestedParavirt);
        assert!(!c.can_boot_linux);
        assert!(c.summary.contains("kvm_pvm"));
        // The PVM module wins even if a flag leaks through.
        assert_eq!(
            classify("vmx", true, true).virtualization,
            Virtualization::NestedParavirt
        );
        // "vmx" must be a whole flag, not a substring.
        assert_eq!(
            classify("fpu vmxfoo", false, true).virtualization,
            Virtualization::None
        );
        assert!(!classify("vmx", false, false).can_boot_linux);
    }
}
