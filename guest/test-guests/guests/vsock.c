/* vsock: a small polled virtio-vsock driver over virtio-mmio (version 2) that opens connections
 * to a host port, for hostile-guest tests of the VMM's vsock device.
 *
 * Finds the device at the `dev_index=N`-th (default 0) `virtio_mmio.device=4K@0x<base>:<irq>` on
 * the command line, negotiates VIRTIO_F_VERSION_1, sets up rx/tx/event queues, then sends `conns=N`
 * (default 1) connection REQUESTs to host port `port=P` (default 5000), from guest ports 10000,
 * 10001, ..., without waiting for the answers. Prints `vsock: sent <N>`, signals READY, then
 * polls the rx queue until every request has its RESPONSE or RST and prints
 * `vsock: responses=<r> rst=<s>`; then spins forever (the VM stays up). Polls the rings (no
 * interrupts). */
#define QSIZE 64

#include "virtio_mmio.h"

#define HOST_CID 2
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define FIRST_GUEST_PORT 10000

#define RX_BUF 64

struct hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
} __attribute__((packed));

_Static_assert(sizeof(struct hdr) == 44, "vsock header");

static struct virtq rings[3];
static u16 next_avail[3];
static u16 last_used[3];
static u8 rx_bufs[QSIZE][RX_BUF] __attribute__((aligned(64)));
static struct hdr tx_pkt __attribute__((aligned(64)));
static u64 base;
static u64 responses, rsts;

static void fail(const char *what)
{
	put_str("vsock: FAIL ");
	put_str(what);
	put_char('\n');
	guest_exit();
}

/* Makes rx buffer `id` available again. */
static void post_rx(u16 id)
{
	struct virtq *r = &rings[0];
	virtq_set_desc(&r->desc[id], (u64)rx_bufs[id], RX_BUF, VIRTQ_DESC_F_WRITE, 0);
	virtq_add_avail(&r->avail, &next_avail[0], id);
}

/* Counts the answers the device delivered and gives their buffers back. */
static void drain_rx(u64 conns)
{
	struct virtq *r = &rings[0];
	int posted = 0;
	while (virtq_used_idx(&r->used) != last_used[0]) {
		u32 id = virtq_take_used(&r->used, &last_used[0]).id;
		if (id >= QSIZE)
			fail("bad used id");
		struct hdr *h = (struct hdr *)rx_bufs[id];
		if (h->dst_port >= FIRST_GUEST_PORT && h->dst_port < FIRST_GUEST_PORT + conns) {
			if (h->op == OP_RESPONSE)
				responses++;
			else if (h->op == OP_RST)
				rsts++;
		}
		post_rx((u16)id);
		posted = 1;
	}
	if (posted)
		virtq_publish(base, 0, &r->avail, next_avail[0]);
	virtio_mmio_ack_interrupts(base);
}

/* Sends one REQUEST and waits until the device has taken it (not for the answer). */
static void send_request(u64 cid, u32 src_port, u32 dst_port, u64 conns)
{
	struct virtq *r = &rings[1];
	memset(&tx_pkt, 0, sizeof(tx_pkt));
	tx_pkt.src_cid = cid;
	tx_pkt.dst_cid = HOST_CID;
	tx_pkt.src_port = src_port;
	tx_pkt.dst_port = dst_port;
	tx_pkt.type = TYPE_STREAM;
	tx_pkt.op = OP_REQUEST;
	tx_pkt.buf_alloc = 4096;
	virtq_set_desc(&r->desc[0], (u64)&tx_pkt, sizeof(tx_pkt), 0, 0);
	virtq_add_avail(&r->avail, &next_avail[1], 0);
	virtq_publish(base, 1, &r->avail, next_avail[1]);
	for (u64 spins = 0; virtq_used_idx(&r->used) != next_avail[1]; spins++) {
		if (spins > 20000000)
			fail("timeout waiting for the tx used ring");
		drain_rx(conns);
		cpu_relax();
	}
	last_used[1] = next_avail[1];
}

void guest_main(const u8 *bp)
{
	base = virtio_mmio_announced_base(bp, cmdline_u64(bp, "dev_index", 0));
	if (base == 0)
		fail("no virtio_mmio.device= on the command line");
	if (virtio_mmio_probe(base) != VIRTIO_ID_VSOCK)
		fail("not a virtio-mmio v2 vsock device");
	u64 port = cmdline_u64(bp, "port", 5000);
	u64 conns = cmdline_u64(bp, "conns", 1);
	if (conns > 60000)
		conns = 60000;

	virtio_mmio_begin(base);
	if (!(virtio_mmio_device_features(base, 1) & VIRTIO_F_VERSION_1_HI))
		fail("device does not offer VIRTIO_F_VERSION_1");
	if (!virtio_mmio_accept_features(base, 0))
		fail("FEATURES_OK refused");
	for (u32 q = 0; q < 3; q++) {
		struct virtq *r = &rings[q];
		if (!virtio_mmio_setup_queue(base, q, r->desc, &r->avail, &r->used))
			fail("queue too small");
	}
	virtio_mmio_driver_ok(base);
	u64 cid = virtio_mmio_config64(base, 0);

	for (u16 i = 0; i < QSIZE; i++)
		post_rx(i);
	virtq_publish(base, 0, &rings[0].avail, next_avail[0]);

	for (u64 i = 0; i < conns; i++)
		send_request(cid, (u32)(FIRST_GUEST_PORT + i), (u32)port, conns);
	put_str("vsock: sent ");
	put_dec(conns);
	put_char('\n');
	signal_ready();
	while (responses + rsts < conns) {
		drain_rx(conns);
		cpu_relax();
	}
	put_str("vsock: responses=");
	put_dec(responses);
	put_str(" rst=");
	put_dec(rsts);
	put_char('\n');
	for (;;)
		cpu_relax();
}
