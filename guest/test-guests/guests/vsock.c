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
#include "lib.h"

#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_INTERRUPT_STATUS 0x060
#define REG_INTERRUPT_ACK 0x064
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG 0x100

#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8

#define VIRTQ_DESC_F_WRITE 2

#define VSOCK_DEVICE_ID 19
#define HOST_CID 2
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define FIRST_GUEST_PORT 10000

#define QSIZE 64
#define RX_BUF 64

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
} __attribute__((packed));

struct avail {
	u16 flags;
	u16 idx;
	u16 ring[QSIZE];
	u16 used_event;
} __attribute__((packed));

struct used_elem {
	u32 id;
	u32 len;
} __attribute__((packed));

struct used {
	u16 flags;
	u16 idx;
	struct used_elem ring[QSIZE];
	u16 avail_event;
} __attribute__((packed));

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

struct ring {
	struct desc desc[QSIZE] __attribute__((aligned(4096)));
	struct avail avail __attribute__((aligned(4096)));
	struct used used __attribute__((aligned(4096)));
};

static struct ring rings[3];
static u16 next_avail[3];
static u16 last_used[3];
static u8 rx_bufs[QSIZE][RX_BUF] __attribute__((aligned(64)));
static struct hdr tx_pkt __attribute__((aligned(64)));
static u64 base;
static u64 responses, rsts;

static inline u32 rd(u64 off)
{
	return *(volatile u32 *)(base + off);
}

static inline void wr(u64 off, u32 v)
{
	*(volatile u32 *)(base + off) = v;
}

static inline void barrier(void)
{
	__asm__ volatile("mfence" ::: "memory");
}

/* The hex base of the `index`-th "virtio_mmio.device=...@0x<base>" in the cmdline; 0 if absent. */
static u64 announced_base(const u8 *bp, u64 index)
{
	usize len;
	const char *c = cmdline_get(bp, &len);
	const char *key = "virtio_mmio.device=";
	for (usize i = 0; c && i + 19 < len; i++) {
		if (memcmp(c + i, key, 19) != 0)
			continue;
		if (index > 0) {
			index--;
			continue;
		}
		usize j = i + 19;
		while (j < len && c[j] != '@' && c[j] != ' ')
			j++;
		if (j + 2 >= len || c[j] != '@' || c[j + 1] != '0' || c[j + 2] != 'x')
			return 0;
		u64 v = 0;
		for (j += 3; j < len; j++) {
			char ch = c[j];
			if (ch >= '0' && ch <= '9')
				v = v * 16 + (u64)(ch - '0');
			else if (ch >= 'a' && ch <= 'f')
				v = v * 16 + (u64)(ch - 'a' + 10);
			else
				break;
		}
		return v;
	}
	return 0;
}

static void fail(const char *what)
{
	put_str("vsock: FAIL ");
	put_str(what);
	put_char('\n');
	guest_exit();
}

static void setup_queue(u32 q)
{
	struct ring *r = &rings[q];
	wr(REG_QUEUE_SEL, q);
	if (rd(REG_QUEUE_NUM_MAX) < QSIZE)
		fail("queue too small");
	wr(REG_QUEUE_NUM, QSIZE);
	wr(REG_QUEUE_DESC_LOW, (u32)(u64)r->desc);
	wr(REG_QUEUE_DESC_HIGH, (u32)((u64)r->desc >> 32));
	wr(REG_QUEUE_DRIVER_LOW, (u32)(u64)&r->avail);
	wr(REG_QUEUE_DRIVER_HIGH, (u32)((u64)&r->avail >> 32));
	wr(REG_QUEUE_DEVICE_LOW, (u32)(u64)&r->used);
	wr(REG_QUEUE_DEVICE_HIGH, (u32)((u64)&r->used >> 32));
	wr(REG_QUEUE_READY, 1);
}

/* Makes rx buffer `id` available again. */
static void post_rx(u16 id)
{
	struct ring *r = &rings[0];
	r->desc[id].addr = (u64)rx_bufs[id];
	r->desc[id].len = RX_BUF;
	r->desc[id].flags = VIRTQ_DESC_F_WRITE;
	r->desc[id].next = 0;
	r->avail.ring[next_avail[0] % QSIZE] = id;
	next_avail[0]++;
}

/* Counts the answers the device delivered and gives their buffers back. */
static void drain_rx(u64 conns)
{
	struct ring *r = &rings[0];
	int posted = 0;
	while (*(volatile u16 *)&r->used.idx != last_used[0]) {
		barrier();
		u32 id = r->used.ring[last_used[0] % QSIZE].id;
		last_used[0]++;
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
	if (posted) {
		barrier();
		r->avail.idx = next_avail[0];
		barrier();
		wr(REG_QUEUE_NOTIFY, 0);
	}
	wr(REG_INTERRUPT_ACK, rd(REG_INTERRUPT_STATUS));
}

/* Sends one REQUEST and waits until the device has taken it (not for the answer). */
static void send_request(u64 cid, u32 src_port, u32 dst_port, u64 conns)
{
	struct ring *r = &rings[1];
	memset(&tx_pkt, 0, sizeof(tx_pkt));
	tx_pkt.src_cid = cid;
	tx_pkt.dst_cid = HOST_CID;
	tx_pkt.src_port = src_port;
	tx_pkt.dst_port = dst_port;
	tx_pkt.type = TYPE_STREAM;
	tx_pkt.op = OP_REQUEST;
	tx_pkt.buf_alloc = 4096;
	r->desc[0].addr = (u64)&tx_pkt;
	r->desc[0].len = sizeof(tx_pkt);
	r->desc[0].flags = 0;
	r->desc[0].next = 0;
	r->avail.ring[next_avail[1] % QSIZE] = 0;
	barrier();
	next_avail[1]++;
	r->avail.idx = next_avail[1];
	barrier();
	wr(REG_QUEUE_NOTIFY, 1);
	for (u64 spins = 0; *(volatile u16 *)&r->used.idx != next_avail[1]; spins++) {
		if (spins > 20000000)
			fail("timeout waiting for the tx used ring");
		drain_rx(conns);
		__asm__ volatile("pause");
	}
	last_used[1] = next_avail[1];
}

void guest_main(const u8 *bp)
{
	base = announced_base(bp, cmdline_u64(bp, "dev_index", 0));
	if (base == 0)
		fail("no virtio_mmio.device= on the command line");
	if (rd(REG_MAGIC) != 0x74726976 || rd(REG_VERSION) != 2 ||
	    rd(REG_DEVICE_ID) != VSOCK_DEVICE_ID)
		fail("not a virtio-mmio v2 vsock device");
	u64 port = cmdline_u64(bp, "port", 5000);
	u64 conns = cmdline_u64(bp, "conns", 1);
	if (conns > 60000)
		conns = 60000;

	wr(REG_STATUS, 0);
	wr(REG_STATUS, STATUS_ACK);
	wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
	wr(REG_DEVICE_FEATURES_SEL, 1);
	if (!(rd(REG_DEVICE_FEATURES) & 1))
		fail("device does not offer VIRTIO_F_VERSION_1");
	wr(REG_DRIVER_FEATURES_SEL, 1);
	wr(REG_DRIVER_FEATURES, 1);
	wr(REG_DRIVER_FEATURES_SEL, 0);
	wr(REG_DRIVER_FEATURES, 0);
	wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(rd(REG_STATUS) & STATUS_FEATURES_OK))
		fail("FEATURES_OK refused");
	for (u32 q = 0; q < 3; q++)
		setup_queue(q);
	wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	u64 cid = (u64)rd(REG_CONFIG) | ((u64)rd(REG_CONFIG + 4) << 32);

	for (u16 i = 0; i < QSIZE; i++)
		post_rx(i);
	barrier();
	rings[0].avail.idx = next_avail[0];
	barrier();
	wr(REG_QUEUE_NOTIFY, 0);

	for (u64 i = 0; i < conns; i++)
		send_request(cid, (u32)(FIRST_GUEST_PORT + i), (u32)port, conns);
	put_str("vsock: sent ");
	put_dec(conns);
	put_char('\n');
	signal_ready();
	while (responses + rsts < conns) {
		drain_rx(conns);
		__asm__ volatile("pause");
	}
	put_str("vsock: responses=");
	put_dec(responses);
	put_str(" rst=");
	put_dec(rsts);
	put_char('\n');
	for (;;)
		__asm__ volatile("pause");
}
