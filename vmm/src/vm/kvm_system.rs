//! `/dev/kvm`, opened once per VM: the capabilities the VMM needs checked, and what it reads of
//! the host's KVM (supported CPUID, the MSRs it can save). A restore checks a snapshot against
//! it while the shell creates its VM with it, so nothing of it is opened or read twice.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use kvm_bindings::CpuId;
use kvm_ioctls::{Cap, Kvm};

use super::{BuildVmError, kvm_err};
use crate::persist;

/// `/dev/kvm` opened by the caller before it gave up the right to open it (a jailed process: the
/// device is root's, and the jail has no `/dev/kvm`); [`KvmSystem::open`] uses a duplicate of it.
static DEVICE: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// The host's KVM system fd and what the VMM reads of it once.
#[derive(Debug)]
pub struct KvmSystem {
    kvm: Kvm,
    supported_cpuid: CpuId,
    msr_indices: Arc<Vec<u32>>,
}

impl KvmSystem {
    /// Opens `/dev/kvm`, checks the capabilities the VMM needs, and reads the supported CPUID and
    /// the MSR index list.
    pub fn open() -> Result<Self, BuildVmError> {
        let kvm = match Self::preopened()? {
            Some(kvm) => kvm,
            None => Kvm::new().map_err(BuildVmError::OpenKvm)?,
        };
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(BuildVmError::MissingCap(name));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_indices = Arc::new(persist::msr_index_list(&kvm)?);
        Ok(Self {
            kvm,
            supported_cpuid,
            msr_indices,
        })
    }

    /// Opens `/dev/kvm` now and keeps it for the next [`Self::open`] of this process (which
    /// then needs no access to the device node).
    pub fn preopen() -> Result<(), BuildVmError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/kvm")
            .map_err(|e| {
                BuildVmError::OpenKvm(kvm_ioctls::Error::new(
                    e.raw_os_error().unwrap_or(libc::EIO),
                ))
            })?;
        *DEVICE.lock().unwrap_or_else(|e| e.into_inner()) = Some(OwnedFd::from(f));
        Ok(())
    }

    /// The pre-opened device, as a [`Kvm`] (taken: a jailed process makes one VM).
    fn preopened() -> Result<Option<Kvm>, BuildVmError> {
        let Some(dev) = DEVICE.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(None);
        };
        // SAFETY: `dev` is a descriptor of /dev/kvm owned by nothing else; the Kvm takes it
        // over (and closes it when dropped).
        Ok(Some(unsafe {
            Kvm::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(dev))
        }))
    }

    /// The system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// What KVM_GET_SUPPORTED_CPUID answered.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// The MSRs a snapshot saves.
    pub fn msr_indices(&self) -> &Arc<Vec<u32>> {
        &self.msr_indices
    }
}
