//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2), as a [`BusDevice`].
//!
//! The transport holds the registers the driver programs (features, queue addresses, status) and
//! the device's front ([`VirtioDevice`]). On DRIVER_OK it builds and validates the queues and
//! activates the front, which hands them to the device's worker on the event loop. Queue
//! notifications go to one `EventFd` per queue: KVM writes them directly when the VMM registers
//! each as an ioeventfd on [`NOTIFY_OFFSET`] with datamatch = queue index; a notify that reaches
//! the transport through the bus (no ioeventfd, or tests) writes the same `EventFd`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::worker::build_queue;
use super::{ActivateError, Activation, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::bus::BusDevice;
use crate::persist::Persist;

/// "virt", little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio version.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the driver ("KSNP").
pub const VENDOR_ID: u32 = 0x504e_534b;
/// Offset of the QueueNotify register: where the VMM registers the queues' ioeventfds.
pub const NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// The kernel command-line fragment announcing a virtio-mmio device of `size` bytes at `base`
/// with interrupt `irq` (Linux `virtio_mmio.device=<size>@<base>:<irq>`).
pub fn kernel_cmdline_fragment(base: u64, size: u64, irq: u32) -> String {
    let size = if size != 0 && size.is_multiple_of(1 << 20) {
        format!("{}M", size >> 20)
    } else if size != 0 && size.is_multiple_of(1 << 10) {
        format!("{}K", size >> 10)
    } else {
        size.to_string()
    };
    format!("virtio_mmio.device={size}@{base:#x}:{irq}")
}

/// The registers of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc.
    pub desc: u64,
    /// QueueDriver (available ring).
    pub avail: u64,
    /// QueueDevice (used ring).
    pub used: u64,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    queues: Vec<QueueRegs>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("queues", &self.queues)
            .finish()
    }
}

impl MmioTransport {
    /// A transport for `device`, with `queue_evts` (one per queue; the worker keeps clones) and
    /// the `interrupt` shared with the worker.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let n = device.queue_max_sizes().len();
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueRegs {
                size: max,
                ..Default::default()
            })
            .collect();
        debug_assert_eq!(n, queue_evts.len());
        Self {
            device,
            mem,
            interrupt,
            queue_evts,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            queues,
        }
    }

    /// The queue notification `EventFd`s, in queue order, to register as ioeventfds on
    /// [`NOTIFY_OFFSET`] with datamatch = queue index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt whose [`Interrupt::irqfd`] is registered with KVM as an irqfd.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device front.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The status register as the driver reads it.
    pub fn status(&self) -> u32 {
        let needs_reset = if self.interrupt.needs_reset() {
            VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            0
        };
        self.status | needs_reset
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut QueueRegs)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn reset(&mut self) {
        if self.device.is_activated() {
            self.device.reset();
        }
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        for (q, &max) in self.queues.iter_mut().zip(self.device.queue_max_sizes()) {
            *q = QueueRegs {
                size: max,
                ..Default::default()
            };
        }
        self.interrupt.reset();
    }

    fn features_ok(&self) -> bool {
        let offered = self.device.avail_features();
        self.acked_features & !offered == 0 && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    /// Builds the queues from the registers, checking each against guest memory.
    fn build_activation(&self) -> Option<Activation> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (r, &max)) in self
            .queues
            .iter()
            .zip(self.device.queue_max_sizes())
            .enumerate()
        {
            let q = build_queue(max, r.size, r.desc, r.avail, r.used).ok()?;
            if !r.ready || !q.is_valid(&self.mem) {
                crate::guest_warn!("virtio-mmio: queue {i} not ready or invalid at DRIVER_OK");
                return None;
            }
            queues.push(q);
        }
        Some(Activation {
            mem: self.mem.clone(),
            queues,
            acked_features: self.acked_features,
            reset_gen: self.interrupt.resets(),
        })
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        match self.build_activation() {
            Some(a) => self.device.activate(a),
            None => Err(ActivateError::QueueCount {
                expected: self.queues.len(),
                got: 0,
            }),
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            crate::guest_warn!("virtio-mmio: driver cleared status bits {old:#x} -> {value:#x}");
            return;
        }
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
        }
        let new = value & !old;
        // Bits are taken in the order of the initialization sequence (3.1.1); each needs the one
        // before it. A bit out of order is ignored, so the driver reads back a status without it.
        for (bit, needs) in [
            (VIRTIO_CONFIG_S_ACKNOWLEDGE, 0),
            (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER),
            (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK),
        ] {
            if new & bit == 0 {
                continue;
            }
            if self.status & needs != needs {
                crate::guest_warn!("virtio-mmio: status bit {bit:#x} set out of order");
                return;
            }
            if bit == VIRTIO_CONFIG_S_FEATURES_OK && !self.features_ok() {
                crate::guest_warn!(
                    "virtio-mmio: driver acked features {:#x} not offered ({:#x}) or without VERSION_1",
                    self.acked_features,
                    self.device.avail_features()
                );
                return;
            }
            self.status |= bit;
            if bit == VIRTIO_CONFIG_S_DRIVER_OK
                && let Err(e) = self.activate()
            {
                tracing::warn!("virtio-mmio: activation failed: {e}");
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn read_reg(&self, offset: u32) -> u32 {
        let q = self.queues.get(self.queue_select as usize);
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .device
                .queue_max_sizes()
                .get(self.queue_select as usize)
                .map_or(0, |&m| u32::from(m)),
            reg::VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.status(),
            // No shared memory regions: length all ones (4.2.2.1).
            reg::VIRTIO_MMIO_SHM_LEN_LOW | reg::VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                tracing::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        let features_writable = self.status
            & (VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
            == VIRTIO_CONFIG_S_DRIVER;
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES if features_writable => {
                match self.driver_features_select {
                    0 => set_low(&mut self.acked_features, v),
                    1 => set_high(&mut self.acked_features, v),
                    _ => {}
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = v,
            reg::VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.size = v as u16;
                }
            }
            reg::VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.ready = v == 1;
                }
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => self.with_queue(|q| set_low(&mut q.desc, v)),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => self.with_queue(|q| set_high(&mut q.desc, v)),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.with_queue(|q| set_low(&mut q.avail, v)),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.with_queue(|q| set_high(&mut q.avail, v)),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => self.with_queue(|q| set_low(&mut q.used, v)),
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.with_queue(|q| set_high(&mut q.used, v)),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-mmio: cannot notify queue {v}: {e}");
                    }
                }
                None => tracing::debug!("virtio-mmio: notify of unknown queue {v}"),
            },
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            reg::VIRTIO_MMIO_STATUS => self.set_status(v),
            reg::VIRTIO_MMIO_SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio: ignored write {v:#x} at {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(reg::VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // Registers are 32-bit, naturally aligned (4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset as u32).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(reg::VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_reg(offset as u32, u32::from_le_bytes(bytes));
        }
    }
}

/// The transport's registers in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The device id, checked on restore.
    pub device_type: u32,
    /// The device's queue maximum sizes, checked on restore.
    pub queue_max_sizes: Vec<u16>,
    /// Status register (without DEVICE_NEEDS_RESET, which is `needs_reset`).
    pub status: u32,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// QueueSel.
    pub queue_select: u32,
    /// Per-queue registers.
    pub queues: Vec<QueueRegs>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
}

/// What restoring a transport needs besides its state.
#[derive(Debug)]
pub struct MmioTransportArgs {
    /// The device front, built for the restored device.
    pub device: Box<dyn VirtioDevice>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The interrupt shared with the device's worker.
    pub interrupt: Arc<Interrupt>,
    /// The queue notification `EventFd`s shared with the device's worker.
    pub queue_evts: Vec<EventFd>,
}

impl std::fmt::Debug for dyn VirtioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VirtioDevice(type {})", self.device_type())
    }
}

/// Why a transport state was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreTransportError {
    /// The state is for another kind of device.
    #[error("snapshot has device type {saved}, device is type {device}")]
    DeviceType {
        /// In the state.
        saved: u32,
        /// The device's.
        device: u32,
    },
    /// The queue count or a maximum size differs.
    #[error("snapshot queues {saved:?} differ from the device's {device:?}")]
    Queues {
        /// In the state.
        saved: Vec<u16>,
        /// The device's.
        device: Vec<u16>,
    },
    /// A queue size is not a power of two up to the maximum.
    #[error("queue {0} has an invalid size")]
    QueueSize(usize),
    /// Acked features the device does not offer.
    #[error("acked features {acked:#x} not a subset of offered {offered:#x}")]
    Features {
        /// In the state.
        acked: u64,
        /// The device's.
        offered: u64,
    },
    /// Re-activating the device failed.
    #[error("reactivating the device: {0}")]
    Activate(#[from] ActivateError),
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs;
    type Error = RestoreTransportError;

    fn save(&self) -> MmioTransportState {
        MmioTransportState {
            device_type: self.device.device_type(),
            queue_max_sizes: self.device.queue_max_sizes().to_vec(),
            status: self.status,
            acked_features: self.acked_features,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            queues: self.queues.clone(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            needs_reset: self.interrupt.needs_reset(),
        }
    }

    fn restore(args: MmioTransportArgs, s: &MmioTransportState) -> Result<Self, Self::Error> {
        let device = args.device.device_type();
        if s.device_type != device {
            return Err(RestoreTransportError::DeviceType {
                saved: s.device_type,
                device,
            });
        }
        let max = args.device.queue_max_sizes().to_vec();
        if s.queue_max_sizes != max || s.queues.len() != max.len() {
            return Err(RestoreTransportError::Queues {
                saved: s.queue_max_sizes.clone(),
                device: max,
            });
        }
        // Check what the restored device relies on. Before FEATURES_OK and DRIVER_OK a driver
        // (part-way through set-up, or hostile) may leave any acked features and queue sizes in
        // the registers, which those bits check when they are set: such a state must restore.
        let activated = s.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !s.needs_reset;
        for (i, (q, &m)) in s.queues.iter().zip(&max).enumerate() {
            if activated && (q.size == 0 || q.size > m || !q.size.is_power_of_two()) {
                return Err(RestoreTransportError::QueueSize(i));
            }
        }
        let offered = args.device.avail_features();
        if s.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && s.acked_features & !offered != 0 {
            return Err(RestoreTransportError::Features {
                acked: s.acked_features,
                offered,
            });
        }
        args.interrupt
            .restore(s.interrupt_status, s.config_generation, s.needs_reset);
        let mut t = MmioTransport::new(args.device, args.mem, args.interrupt, args.queue_evts);
        t.status = s.status;
        t.acked_features = s.acked_features;
        t.device_features_select = s.device_features_select;
        t.driver_features_select = s.driver_features_select;
        t.queue_select = s.queue_select;
        t.queues = s.queues.clone();
        if t.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !s.needs_reset {
            t.activate()?;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_kernel_cmdline_fragment_first_slot_is_exact() {
        assert_eq!(
            kernel_cmdline_fragment(0xd000_0000, 0x1000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            kernel_cmdline_fragment(0xd000_1000, 0x20_0000, 12),
            "virtio_mmio.device=2M@0xd0001000:12"
        );
        assert_eq!(
            kernel_cmdline_fragment(0x1000, 0x200, 1),
            "virtio_mmio.device=512@0x1000:1"
        );
    }
}
