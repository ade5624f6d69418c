//! Save and restore of device state for snapshots.
//!
//! Modelled on Firecracker's `Persist`: [`Persist::save`] returns a plain serde state and cannot
//! fail; [`Persist::restore`] *builds a new* object from that state or refuses it. Everything that
//! is not plain data (guest memory, file descriptors, backing files, sockets) comes in through
//! [`Persist::ConstructorArgs`] and is never part of the state, so a state can be written to a
//! snapshot file and read back on another host.
//!
//! Both methods are required: a device that forgets its state does not compile.

/// A type whose state can be saved into, and rebuilt from, a snapshot.
pub trait Persist: Sized {
    /// The plain-data state (serde-serializable).
    type State;
    /// What restoring needs besides the state: memory, fds, files.
    type ConstructorArgs;
    /// Why a state was refused.
    type Error;

    /// Captures the state. Cannot fail.
    fn save(&self) -> Self::State;

    /// Builds a new object from `state`, validating it first (a snapshot is untrusted input).
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
