//! x86-64 specifics of booting a vCPU: descriptor tables, page tables, registers, CPUID, MSRs, the
//! local APIC and the MP table. Everything here is pure (bytes and structs) or one KVM call, so it
//! is unit-tested without a VM.

pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod mptable;
pub mod msr;
pub mod regs;
