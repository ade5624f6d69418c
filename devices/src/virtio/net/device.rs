use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use vm_memory::GuestMemoryMmap;

use super::backend::Backend;
use super::handler::NetHandler;
use crate::virtio::VIRTIO_F_VERSION_1;
use crate::virtio::front::{Front, MmioDevice, Parts};
use crate::virtio::worker::HandoffTx;

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;

/// A virtio-net device: [`MmioDevice::transport`] on the MMIO bus, [`MmioDevice::event_source`]
/// on the loop.
pub type Net = MmioDevice<NetHandler>;

/// Options of a virtio-net device (`--net ID[,tap=NAME][,mac=MAC]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The device's id (names the slot a restore attaches a tap to).
    pub id: String,
    /// The MAC address the guest reads from the config space.
    pub mac: [u8; 6],
}

/// Errors creating a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC is a multicast address (the guest driver would refuse it and pick a random one).
    #[error("MAC {0} is a multicast address")]
    MulticastMac(String),
    /// An fd could not be created.
    #[error("virtio-net: {0}")]
    Io(#[from] std::io::Error),
}

/// A random locally administered unicast MAC (`x2:xx:xx:xx:xx:xx`).
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    if getrandom::fill(&mut mac).is_err() {
        mac = [0, 0x16, 0x3e, 0x4b, 0x53, 0x4e];
    }
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// `aa:bb:cc:dd:ee:ff`.
pub(super) fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The features the device offers, with or without a backend (a template's slot offers what any
/// tap will allow, since a restored driver keeps what it acked).
pub(super) fn features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
    ]
    .iter()
    .fold(0u64, |f, &bit| f | (1u64 << bit))
}

/// `struct virtio_net_config`: mac, status, max_virtqueue_pairs.
pub(super) fn config_space(mac: &[u8; 6], link_up: bool) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0..6].copy_from_slice(mac);
    let status = if link_up {
        VIRTIO_NET_S_LINK_UP as u16
    } else {
        0
    };
    c[6..8].copy_from_slice(&status.to_le_bytes());
    c[8..10].copy_from_slice(&1u16.to_le_bytes());
    c
}

pub(super) fn front(mac: [u8; 6], link_up: bool) -> impl FnOnce(HandoffTx) -> Front {
    move |tx| {
        Front::new(
            virtio_bindings::virtio_ids::VIRTIO_ID_NET,
            features(),
            vec![QUEUE_SIZE; 2],
            config_space(&mac, link_up),
            tx,
        )
    }
}

pub(super) fn check_mac(mac: &[u8; 6]) -> Result<(), NetError> {
    if mac[0] & 1 != 0 {
        return Err(NetError::MulticastMac(mac_string(mac)));
    }
    Ok(())
}

impl MmioDevice<NetHandler> {
    /// A new virtio-net device over `mem`; `backend: None` makes a slot (link down, frames the
    /// guest sends dropped) that a restore gives a tap.
    pub fn new_net(
        config: NetConfig,
        backend: Option<Backend>,
        mem: GuestMemoryMmap,
    ) -> Result<Net, NetError> {
        check_mac(&config.mac)?;
        let link_up = backend.is_some();
        let handler = NetHandler::new(config.id, config.mac, backend);
        Ok(Net::new(
            front(config.mac, link_up),
            handler,
            mem,
            Parts::new(2)?,
        ))
    }
}
