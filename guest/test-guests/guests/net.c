/* net: a small polled virtio-net driver over virtio-mmio (version 2) that asks the host for its
 * MAC with ARP, for tests of the VMM's virtio-net device and of attaching a tap at restore.
 *
 * Finds the device at the `dev_index=N`-th (default 0) `virtio_mmio.device=` on the command
 * line, negotiates VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS (no offloads, no
 * mergeable buffers), sets up the receive and transmit queues and posts receive buffers; prints
 * `net: mac=<mac> link=<0|1>` and signals READY (a template is snapshotted here: its device may
 * be a slot with the link down). Then it waits for the link to be up (a restore that attaches a
 * tap announces it with a config change) and prints `net: link up`; sends an ARP request for
 * 10.<subnet>.0.1 from 10.<subnet>.0.2 (`subnet=N`, default 77) every so often until an ARP
 * reply for it arrives, prints `net: arp reply from <mac> to <mac> after <n> requests` (the
 * host's MAC, and the guest MAC the host answered), and exits. Every
 * frame it receives is checked (header, length); anything else is skipped. Polls the rings (no
 * interrupts). */
#define QSIZE 16

#include "virtio_mmio.h"

#define VIRTIO_ID_NET 1
#define NET_F_MAC (1u << 5)
#define NET_F_STATUS (1u << 16)
#define NET_S_LINK_UP 1
#define HDR_LEN 12
#define RX_BUF 2048
#define ETH_P_ARP 0x0806

static struct virtq rings[2];
static u16 next_avail[2];
static u16 last_used[2];
static u8 rx_bufs[QSIZE][RX_BUF] __attribute__((aligned(64)));
static u8 tx_frame[128] __attribute__((aligned(64)));
static u64 base;
static u8 mac[6];
static u8 my_ip[4];
static u8 host_ip[4];

static void fail(const char *what)
{
	put_str("net: FAIL ");
	put_str(what);
	put_char('\n');
	guest_exit();
}

static void put_mac(const u8 *m)
{
	static const char hex[] = "0123456789abcdef";
	for (int i = 0; i < 6; i++) {
		if (i)
			put_char(':');
		put_char(hex[m[i] >> 4]);
		put_char(hex[m[i] & 15]);
	}
}

static void post_rx(u16 id)
{
	struct virtq *r = &rings[0];
	virtq_set_desc(&r->desc[id], (u64)rx_bufs[id], RX_BUF, VIRTQ_DESC_F_WRITE, 0);
	virtq_add_avail(&r->avail, &next_avail[0], id);
}

static u16 link_status(void)
{
	/* Bytes 4..8 of the config space: mac[4], mac[5], status (le16). */
	return (u16)(virtio_mmio_rd(base, REG_CONFIG + 4) >> 16);
}

static void put16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

/* Sends an ARP request for host_ip and waits until the device has taken it. */
static void send_arp(void)
{
	u8 *f = tx_frame;
	memset(f, 0, sizeof(tx_frame));
	u8 *e = f + HDR_LEN; /* the virtio-net header stays zero: no offload */
	memset(e, 0xff, 6);
	memcpy(e + 6, mac, 6);
	put16(e + 12, ETH_P_ARP);
	u8 *a = e + 14;
	put16(a, 1);       /* Ethernet */
	put16(a + 2, 0x0800); /* IPv4 */
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, 1); /* request */
	memcpy(a + 8, mac, 6);
	memcpy(a + 14, my_ip, 4);
	memcpy(a + 24, host_ip, 4);
	struct virtq *r = &rings[1];
	virtq_set_desc(&r->desc[0], (u64)f, HDR_LEN + 60, 0, 0);
	virtq_add_avail(&r->avail, &next_avail[1], 0);
	virtq_publish(base, 1, &r->avail, next_avail[1]);
	if (!virtq_wait_used(&r->used, last_used[1], 50000000))
		fail("timeout waiting for the transmit used ring");
	last_used[1] = next_avail[1];
}

/* Takes the frames received so far; 1 if one of them is the ARP reply we wait for. */
static int drain_rx(u8 *from, u8 *to)
{
	struct virtq *r = &rings[0];
	int found = 0, posted = 0;
	while (virtq_used_idx(&r->used) != last_used[0]) {
		struct virtq_used_elem u = virtq_take_used(&r->used, &last_used[0]);
		if (u.id >= QSIZE || u.len > RX_BUF)
			fail("bad used element");
		const u8 *b = rx_bufs[u.id];
		if (u.len < HDR_LEN + 14 || b[10] != 1 || b[11] != 0)
			fail("bad receive header (length or num_buffers)");
		const u8 *e = b + HDR_LEN;
		const u8 *a = e + 14;
		if (u.len >= HDR_LEN + 14 + 28 && e[12] == 0x08 && e[13] == 0x06 && a[7] == 2 &&
		    memcmp(a + 14, host_ip, 4) == 0 && memcmp(a + 24, my_ip, 4) == 0) {
			memcpy(from, a + 8, 6);
			memcpy(to, a + 18, 6);
			found = 1;
		}
		post_rx((u16)u.id);
		posted = 1;
	}
	if (posted)
		virtq_publish(base, 0, &r->avail, next_avail[0]);
	virtio_mmio_ack_interrupts(base);
	return found;
}

void guest_main(const u8 *bp)
{
	base = virtio_mmio_announced_base(bp, cmdline_u64(bp, "dev_index", 0));
	if (base == 0)
		fail("no virtio_mmio.device= on the command line");
	if (virtio_mmio_probe(base) != VIRTIO_ID_NET)
		fail("not a virtio-mmio v2 net device");
	u8 subnet = (u8)cmdline_u64(bp, "subnet", 77);
	my_ip[0] = 10, my_ip[1] = subnet, my_ip[2] = 0, my_ip[3] = 2;
	host_ip[0] = 10, host_ip[1] = subnet, host_ip[2] = 0, host_ip[3] = 1;

	virtio_mmio_begin(base);
	if (!(virtio_mmio_device_features(base, 1) & VIRTIO_F_VERSION_1_HI))
		fail("device does not offer VIRTIO_F_VERSION_1");
	u32 offered = virtio_mmio_device_features(base, 0);
	if ((offered & (NET_F_MAC | NET_F_STATUS)) != (NET_F_MAC | NET_F_STATUS))
		fail("device does not offer MAC and STATUS");
	if (!virtio_mmio_accept_features(base, NET_F_MAC | NET_F_STATUS))
		fail("FEATURES_OK refused");
	for (u32 q = 0; q < 2; q++) {
		struct virtq *r = &rings[q];
		if (!virtio_mmio_setup_queue(base, q, r->desc, &r->avail, &r->used))
			fail("queue too small");
	}
	virtio_mmio_driver_ok(base);
	u32 lo = virtio_mmio_rd(base, REG_CONFIG);
	u32 hi = virtio_mmio_rd(base, REG_CONFIG + 4);
	for (int i = 0; i < 4; i++)
		mac[i] = (u8)(lo >> (8 * i));
	mac[4] = (u8)hi;
	mac[5] = (u8)(hi >> 8);
	for (u16 i = 0; i < QSIZE; i++)
		post_rx(i);
	virtq_publish(base, 0, &rings[0].avail, next_avail[0]);

	put_str("net: mac=");
	put_mac(mac);
	put_str(" link=");
	put_dec(link_status() & NET_S_LINK_UP);
	put_char('\n');
	signal_ready();

	for (u64 spins = 0; !(link_status() & NET_S_LINK_UP); spins++) {
		if (spins > 20000000)
			fail("the link never came up");
		cpu_relax();
	}
	put_str("net: link up\n");

	u8 from[6], to[6];
	for (u64 tries = 1; tries <= 60; tries++) {
		send_arp();
		for (u64 spins = 0; spins < 300000; spins++) {
			if (virtq_used_idx(&rings[0].used) != last_used[0] && drain_rx(from, to)) {
				put_str("net: arp reply from ");
				put_mac(from);
				put_str(" to ");
				put_mac(to);
				put_str(" after ");
				put_dec(tries);
				put_str(" requests\n");
				guest_exit();
			}
			cpu_relax();
		}
	}
	fail("no ARP reply");
}
