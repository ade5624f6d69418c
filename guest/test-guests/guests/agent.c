/* agent: a stand-in for kata-snap's guest agent that speaks just enough of the agent protocol
 * (agent-protocol/src/lib.rs) for `kata-snap run`, `create`/`start` to complete against it, so
 * the runtime's whole host path can be run and timed on a host whose KVM cannot boot Linux at
 * speed. It runs no process and mounts nothing: it answers from the request's argv.
 *
 * Boot: finds the virtio-vsock device among the `virtio_mmio.device=` entries of the command
 * line (the template also has a virtio-blk spare slot), sets up its three queues, posts rx and
 * event buffers, routes the device's interrupt (its GSI from the command line) through the
 * IOAPIC to a vector whose handler only sends the LAPIC an EOI (the 8259s masked, every other
 * IOAPIC pin left masked), prints `agent: listening on <port>` and signals READY (the template
 * is taken there). Then it serves: the event queue (a TRANSPORT_RESET after a restore: the
 * buffer is posted again, which lets the device deliver rx), the rx queue (a REQUEST to port
 * 1024 is accepted, replacing any earlier connection; its data goes to the protocol half); with
 * nothing to do it halts until the next interrupt (`sti; hlt`), so an idle guest costs the
 * host no CPU, as an idle Linux agent does.
 *
 * The agent protocol and what the "process" does: agent_protocol.c. Every length read from the
 * device is bounds-checked. */
#define QSIZE 16

#include "virtio_mmio.h"
#include "agent.h"

#define HOST_CID 2
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUTDOWN_BOTH 3

#define RXQ 0
#define TXQ 1
#define EVQ 2
#define RX_BUF 4096
#define EVT_BUFS 4
/* Our receive buffer as announced: everything received is consumed at once. */
#define BUF_ALLOC 65536

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

/* Interrupts: the device's GSI through the IOAPIC to IRQ_VECTOR on the boot CPU. */
#define IRQ_VECTOR 0x40
#define LAPIC_BASE 0xfee00000ULL
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define IOAPIC_BASE 0xfec00000ULL
#define IOAPIC_PINS 24
#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1

struct idt_gate {
	u16 off_lo;
	u16 sel;
	u8 ist;
	u8 type_attr;
	u16 off_mid;
	u32 off_hi;
	u32 zero;
} __attribute__((packed));

_Static_assert(sizeof(struct idt_gate) == 16, "IDT gate");

static struct idt_gate idt[256] __attribute__((aligned(16)));

static struct virtq rings[3];
static u16 next_avail[3];
static u16 last_used[3];
static u8 rx_bufs[QSIZE][RX_BUF] __attribute__((aligned(64)));
static u32 evt_bufs[EVT_BUFS];
static struct {
	struct hdr h;
	u8 data[OUT_MAX];
} __attribute__((packed)) tx __attribute__((aligned(64)));
static u64 base, cid;

/* The one connection. */
static struct {
	int open;
	u32 peer_port;
	u32 fwd_cnt; /* bytes received and consumed */
} conn;

/* ---- interrupts ---- */

struct interrupt_frame;

/* Every vector from 32 up: the interrupt only wakes the `hlt`; the main loop does the work. */
__attribute__((interrupt)) static void on_irq(struct interrupt_frame *frame)
{
	(void)frame;
	*(volatile u32 *)(LAPIC_BASE + LAPIC_EOI) = 0;
}

static void ioapic_write(u32 reg, u32 v)
{
	*(volatile u32 *)(IOAPIC_BASE + 0x00) = reg;
	*(volatile u32 *)(IOAPIC_BASE + 0x10) = v;
}

/* The GSI after the ':' of the `index`-th "virtio_mmio.device=<size>@0x<base>:<gsi>"; 0 if
 * absent or malformed. */
static u64 announced_gsi(const u8 *bp, u64 index)
{
	usize len;
	const char *c = cmdline_get(bp, &len);
	for (usize i = virtio_mmio_next_arg(c, len, 0); i < len;
	     i = virtio_mmio_next_arg(c, len, i + 1)) {
		if (index-- != 0)
			continue;
		usize j = i + VIRTIO_MMIO_ARG_LEN;
		while (j < len && c[j] != ':' && c[j] != ' ')
			j++;
		if (j >= len || c[j] != ':')
			return 0;
		u64 v = 0;
		for (j++; j < len && c[j] >= '0' && c[j] <= '9' && v < 1000; j++)
			v = v * 10 + (u64)(c[j] - '0');
		return v;
	}
	return 0;
}

static void setup_interrupts(u64 gsi)
{
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	u64 h = (u64)on_irq;
	for (int v = 32; v < 256; v++) {
		idt[v].off_lo = (u16)h;
		idt[v].sel = cs;
		idt[v].ist = 0;
		idt[v].type_attr = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
		idt[v].off_mid = (u16)(h >> 16);
		idt[v].off_hi = (u32)(h >> 32);
	}
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
	outb(PIC1_DATA, 0xff);
	outb(PIC2_DATA, 0xff);
	*(volatile u32 *)(LAPIC_BASE + LAPIC_TPR) = 0;
	*(volatile u32 *)(LAPIC_BASE + LAPIC_SVR) = 0x100 | 0xff; /* enabled, spurious 0xff */
	/* Physical destination APIC 0, then vector, fixed, edge, active high, unmasked. */
	ioapic_write(0x10 + 2 * (u32)gsi + 1, 0);
	ioapic_write(0x10 + 2 * (u32)gsi, IRQ_VECTOR);
}

/* Sleeps until an interrupt (one that came since the last look at the rings is taken at once:
 * `sti` holds interrupts off until after `hlt` has begun). */
static void wait_for_interrupt(void)
{
	__asm__ volatile("sti; hlt; cli" : : : "memory");
}

/* ---- virtio-vsock ---- */

static void post_rx(u16 id)
{
	struct virtq *r = &rings[RXQ];
	virtq_set_desc(&r->desc[id], (u64)rx_bufs[id], RX_BUF, VIRTQ_DESC_F_WRITE, 0);
	virtq_add_avail(&r->avail, &next_avail[RXQ], id);
}

static void post_evt(u16 id)
{
	struct virtq *r = &rings[EVQ];
	virtq_set_desc(&r->desc[id], (u64)&evt_bufs[id], sizeof(evt_bufs[id]), VIRTQ_DESC_F_WRITE,
		       0);
	virtq_add_avail(&r->avail, &next_avail[EVQ], id);
}

/* Sends one packet (header + `len` bytes already in tx.data) and waits until the device took
 * it. The host's credit is not checked: all this guest sends on a connection (a few answers,
 * at most 2 KiB of output) is far below the device's 256 KiB buffer. */
static void send_pkt(u16 op, u32 flags, u32 len)
{
	struct virtq *r = &rings[TXQ];
	tx.h.src_cid = cid;
	tx.h.dst_cid = HOST_CID;
	tx.h.src_port = AGENT_PORT;
	tx.h.dst_port = conn.peer_port;
	tx.h.len = len;
	tx.h.type = TYPE_STREAM;
	tx.h.op = op;
	tx.h.flags = flags;
	tx.h.buf_alloc = BUF_ALLOC;
	tx.h.fwd_cnt = conn.fwd_cnt;
	virtq_set_desc(&r->desc[0], (u64)&tx, sizeof(struct hdr) + len, 0, 0);
	virtq_add_avail(&r->avail, &next_avail[TXQ], 0);
	virtq_publish(base, TXQ, &r->avail, next_avail[TXQ]);
	if (!virtq_wait_used(&r->used, last_used[TXQ], 50000000))
		agent_fail("tx timeout");
	last_used[TXQ] = next_avail[TXQ];
}

/* A control packet to `port` (which need not be the connection's). */
static void send_ctrl(u32 port, u16 op, u32 flags)
{
	u32 keep = conn.peer_port;
	conn.peer_port = port;
	send_pkt(op, flags, 0);
	conn.peer_port = keep;
}

/* ---- what the protocol half uses ---- */

u8 *vsock_out(void)
{
	return tx.data;
}

void vsock_send(u32 len)
{
	if (len > OUT_MAX)
		agent_fail("answer too large");
	if (conn.open)
		send_pkt(OP_RW, 0, len);
}

void vsock_close(void)
{
	if (conn.open)
		send_pkt(OP_SHUTDOWN, SHUTDOWN_BOTH, 0);
}

/* ---- packets from the device ---- */

static void on_packet(const struct hdr *h, const u8 *payload, u32 n)
{
	if (h->type != TYPE_STREAM || h->dst_port != AGENT_PORT || h->src_cid != HOST_CID)
		return;
	if (h->op == OP_REQUEST) {
		conn.open = 1;
		conn.peer_port = h->src_port;
		conn.fwd_cnt = 0;
		proto_reset();
		send_pkt(OP_RESPONSE, 0, 0);
		return;
	}
	if (!conn.open || h->src_port != conn.peer_port) {
		if (h->op != OP_RST)
			send_ctrl(h->src_port, OP_RST, 0);
		return;
	}
	switch (h->op) {
	case OP_RW:
		conn.fwd_cnt += n;
		proto_on_data(payload, n);
		break;
	case OP_CREDIT_REQUEST:
		send_pkt(OP_CREDIT_UPDATE, 0, 0);
		break;
	case OP_SHUTDOWN:
		send_pkt(OP_RST, 0, 0);
		conn.open = 0;
		break;
	case OP_RST:
		conn.open = 0;
		break;
	default:
		break;
	}
}

static int poll_rx(void)
{
	struct virtq *r = &rings[RXQ];
	int posted = 0;
	while (virtq_used_idx(&r->used) != last_used[RXQ]) {
		struct virtq_used_elem e = virtq_take_used(&r->used, &last_used[RXQ]);
		if (e.id >= QSIZE)
			agent_fail("bad rx used id");
		const struct hdr *h = (const struct hdr *)rx_bufs[e.id];
		u32 len = h->len;
		if (e.len >= sizeof(struct hdr) && len <= e.len - sizeof(struct hdr) &&
		    len <= RX_BUF - sizeof(struct hdr))
			on_packet(h, rx_bufs[e.id] + sizeof(struct hdr), len);
		post_rx((u16)e.id);
		posted = 1;
	}
	if (posted)
		virtq_publish(base, RXQ, &r->avail, next_avail[RXQ]);
	return posted;
}

/* A TRANSPORT_RESET (after a restore): connections are gone; the buffer goes back, which tells
 * the device the event was handled. */
static int poll_evt(void)
{
	struct virtq *r = &rings[EVQ];
	int posted = 0;
	while (virtq_used_idx(&r->used) != last_used[EVQ]) {
		struct virtq_used_elem e = virtq_take_used(&r->used, &last_used[EVQ]);
		if (e.id >= EVT_BUFS)
			agent_fail("bad event used id");
		conn.open = 0;
		post_evt((u16)e.id);
		posted = 1;
	}
	if (posted)
		virtq_publish(base, EVQ, &r->avail, next_avail[EVQ]);
	return posted;
}

void guest_main(const u8 *bp)
{
	u64 gsi = 0;
	for (u64 i = 0; base == 0; i++) {
		u64 b = virtio_mmio_announced_base(bp, i);
		if (b == 0)
			agent_fail("no virtio-vsock device on the command line");
		if (virtio_mmio_probe(b) == VIRTIO_ID_VSOCK) {
			base = b;
			gsi = announced_gsi(bp, i);
		}
	}
	if (gsi == 0 || gsi >= IOAPIC_PINS)
		agent_fail("no interrupt for the vsock device on the command line");
	setup_interrupts(gsi);
	virtio_mmio_begin(base);
	if (!(virtio_mmio_device_features(base, 1) & VIRTIO_F_VERSION_1_HI))
		agent_fail("device does not offer VIRTIO_F_VERSION_1");
	if (!virtio_mmio_accept_features(base, 0))
		agent_fail("FEATURES_OK refused");
	for (u32 q = 0; q < 3; q++) {
		struct virtq *r = &rings[q];
		if (!virtio_mmio_setup_queue(base, q, r->desc, &r->avail, &r->used))
			agent_fail("queue too small");
	}
	virtio_mmio_driver_ok(base);
	cid = virtio_mmio_config64(base, 0);

	for (u16 i = 0; i < QSIZE; i++)
		post_rx(i);
	virtq_publish(base, RXQ, &rings[RXQ].avail, next_avail[RXQ]);
	for (u16 i = 0; i < EVT_BUFS; i++)
		post_evt(i);
	virtq_publish(base, EVQ, &rings[EVQ].avail, next_avail[EVQ]);

	put_str("agent: listening on ");
	put_dec(AGENT_PORT);
	put_char('\n');
	signal_ready();
	for (;;) {
		int work = poll_evt();
		work |= poll_rx();
		if (work)
			virtio_mmio_ack_interrupts(base);
		else
			wait_for_interrupt();
	}
}
