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
 * 1024 is accepted, replacing any earlier connection; RW data is reassembled into frames); with
 * nothing to do it halts until the next interrupt (`sti; hlt`), so an idle guest costs the
 * host no CPU, as an idle Linux agent does.
 *
 * Protocol, per connection: Hello -> Hello{4}; SyncTime, Reseed -> Ack; Create -> Created{pid}
 * or Error{ExecNotFound}; Signal(N) before Start -> Exited{128+N}; Start -> Started{pid},
 * Stdout, Stderr, Exited{status}, then SHUTDOWN; Stdin, CloseStdin, Resize are ignored; anything
 * else -> Error{Protocol}. A frame larger than IN_MAX is skipped and answered Error.
 *
 * What the "process" does, from argv (basename of args[0]):
 *   echo W...      stdout `W W ...\n`, status 0
 *   true / false   status 0 / 1
 *   sh -c SCRIPT   SCRIPT is `;`-separated commands, words split on spaces (no quotes):
 *                  `echo W...` as above, `true`, `false`, `exit [N]` (ends the script),
 *                  anything else: stderr `sh: CMD: not found\n`, status 127; the script's
 *                  status is the last command's
 *   sh             status 0 (stdin is empty)
 *   anything else  Create fails: `exec: "NAME": executable file not found in $PATH`
 * Output past OUT_MAX bytes is cut. Every length read from a frame is bounds-checked. */
#define QSIZE 16

#include "virtio_mmio.h"

#define HOST_CID 2
#define AGENT_PORT 1024
#define PROTOCOL_VERSION 4
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
/* Largest frame reassembled (a Create of a busybox bundle is about 1 KiB). */
#define IN_MAX 16384
/* Largest packet payload sent (all answers to one request go in one packet). */
#define OUT_MAX 4096
/* Largest output of the "process" (stdout and stderr each). */
#define PROC_MAX 1024
#define FIRST_PID 100

/* HostMessage variants. */
#define H_HELLO 0
#define H_STDIN 2
#define H_CLOSE_STDIN 3
#define H_SIGNAL 4
#define H_RESIZE 5
#define H_SYNC_TIME 6
#define H_RESEED 7
#define H_CREATE 8
#define H_START 9
/* AgentMessage variants. */
#define A_HELLO 0
#define A_ACK 1
#define A_STARTED 2
#define A_STDOUT 3
#define A_STDERR 4
#define A_EXITED 5
#define A_ERROR 6
#define A_CREATED 7
/* ErrorKind variants. */
#define E_PROTOCOL 1
#define E_INVALID 2
#define E_EXEC_NOT_FOUND 4

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

typedef u64 __attribute__((may_alias, aligned(1))) u64_unaligned;

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
static u32 out_len, frame_start;
static int out_overflow;

/* The one connection. */
static struct {
	int open;
	u32 peer_port;
	u32 fwd_cnt;   /* bytes received and consumed */
	int hello;     /* Hello done */
	int created;   /* a process waits for Start */
	int started;   /* it ran */
	u32 in_len;    /* bytes of a frame being reassembled */
	u32 skip;      /* bytes left of an oversized frame */
	u32 pid;
	u8 status;
	u32 out_n, err_n;
} conn;
static u8 in[IN_MAX];
static u8 proc_out[PROC_MAX], proc_err[PROC_MAX];
static u32 next_pid = FIRST_PID;

static void fail(const char *what)
{
	put_str("agent: FAIL ");
	put_str(what);
	put_char('\n');
	guest_exit();
}

static void copy(u8 *d, const u8 *s, u32 n)
{
	for (; n >= 8; n -= 8, d += 8, s += 8)
		*(u64_unaligned *)d = *(const u64_unaligned *)s;
	while (n--)
		*d++ = *s++;
}

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
		fail("tx timeout");
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

/* ---- frames out: built in tx.data, sent as one packet by flush() ---- */

static void put_byte(u8 b)
{
	if (out_len < OUT_MAX)
		tx.data[out_len++] = b;
	else
		out_overflow = 1;
}

static void put_varint(u64 v)
{
	while (v >= 0x80) {
		put_byte((u8)(v | 0x80));
		v >>= 7;
	}
	put_byte((u8)v);
}

static void put_bytes(const u8 *p, u32 n)
{
	put_varint(n);
	if (out_len + n > OUT_MAX) {
		out_overflow = 1;
		return;
	}
	copy(tx.data + out_len, p, n);
	out_len += n;
}

static void frame_begin(u8 variant)
{
	frame_start = out_len;
	out_len += 4;
	put_byte(variant);
}

static void frame_end(void)
{
	if (out_overflow || out_len > OUT_MAX)
		fail("answer too large");
	u32 len = out_len - frame_start - 4;
	for (int i = 0; i < 4; i++)
		tx.data[frame_start + i] = (u8)(len >> (8 * i));
}

static void msg_simple(u8 variant)
{
	frame_begin(variant);
	frame_end();
}

static void msg_u32(u8 variant, u64 v)
{
	frame_begin(variant);
	put_varint(v);
	frame_end();
}

static void msg_error(u8 kind, const u8 *text, u32 n)
{
	frame_begin(A_ERROR);
	put_varint(kind);
	put_bytes(text, n);
	frame_end();
}

static void msg_error_str(u8 kind, const char *s)
{
	u32 n = 0;
	while (s[n])
		n++;
	msg_error(kind, (const u8 *)s, n);
}

static void flush(void)
{
	if (out_len)
		send_pkt(OP_RW, 0, out_len);
	out_len = 0;
}

/* ---- frames in ---- */

struct reader {
	const u8 *p;
	u32 n, i;
	int bad;
};

static u64 get_varint(struct reader *r)
{
	u64 v = 0;
	for (int shift = 0; shift < 64; shift += 7) {
		if (r->i >= r->n)
			break;
		u8 b = r->p[r->i++];
		v |= (u64)(b & 0x7f) << shift;
		if (!(b & 0x80))
			return v;
	}
	r->bad = 1;
	return 0;
}

/* A string or byte vector: its bytes stay in the frame. */
static const u8 *get_bytes(struct reader *r, u32 *len)
{
	u64 n = get_varint(r);
	if (r->bad || n > r->n - r->i) {
		r->bad = 1;
		*len = 0;
		return r->p;
	}
	const u8 *p = r->p + r->i;
	r->i += (u32)n;
	*len = (u32)n;
	return p;
}

/* ---- the "process" ---- */

static int is_word(const u8 *p, u32 n, const char *w)
{
	u32 i = 0;
	for (; i < n; i++)
		if (w[i] == 0 || w[i] != (char)p[i])
			return 0;
	return w[i] == 0;
}

static void out_append(u8 *buf, u32 *len, const u8 *p, u32 n)
{
	if (*len + n > PROC_MAX)
		n = PROC_MAX - *len;
	copy(buf + *len, p, n);
	*len += n;
}

static void out_str(u8 *buf, u32 *len, const char *s)
{
	while (*s && *len < PROC_MAX)
		buf[(*len)++] = (u8)*s++;
}

/* `echo` of the words in p[0..n) (split on spaces). */
static void echo_words(const u8 *p, u32 n)
{
	int first = 1;
	for (u32 i = 0; i < n;) {
		while (i < n && p[i] == ' ')
			i++;
		u32 j = i;
		while (j < n && p[j] != ' ')
			j++;
		if (j > i) {
			if (!first)
				out_str(proc_out, &conn.out_n, " ");
			out_append(proc_out, &conn.out_n, p + i, j - i);
			first = 0;
		}
		i = j;
	}
	out_str(proc_out, &conn.out_n, "\n");
}

static u8 parse_status(const u8 *p, u32 n, u8 def)
{
	u32 i = 0, v = 0;
	while (i < n && p[i] == ' ')
		i++;
	if (i == n || p[i] < '0' || p[i] > '9')
		return def;
	for (; i < n && p[i] >= '0' && p[i] <= '9'; i++)
		v = (v * 10 + (u32)(p[i] - '0')) & 0xffff;
	return (u8)v;
}

static void run_script(const u8 *s, u32 n)
{
	u8 status = 0;
	for (u32 i = 0; i < n;) {
		while (i < n && (s[i] == ' ' || s[i] == ';'))
			i++;
		u32 end = i;
		while (end < n && s[end] != ';')
			end++;
		u32 w = i;
		while (w < end && s[w] != ' ')
			w++;
		if (w == i)
			break;
		const u8 *cmd = s + i;
		u32 cn = w - i;
		if (is_word(cmd, cn, "echo")) {
			echo_words(s + w, end - w);
			status = 0;
		} else if (is_word(cmd, cn, "true")) {
			status = 0;
		} else if (is_word(cmd, cn, "false")) {
			status = 1;
		} else if (is_word(cmd, cn, "exit")) {
			conn.status = parse_status(s + w, end - w, status);
			return;
		} else {
			out_str(proc_err, &conn.err_n, "sh: ");
			out_append(proc_err, &conn.err_n, cmd, cn);
			out_str(proc_err, &conn.err_n, ": not found\n");
			status = 127;
		}
		i = end;
	}
	conn.status = status;
}

/* Handles Create: decides what the process does from its argv (the first field of the
 * request), answers Created or Error. */
static void on_create(struct reader *r)
{
	if (conn.created || conn.started) {
		msg_error_str(E_PROTOCOL, "a process was already created on this connection");
		return;
	}
	u64 argc = get_varint(r);
	u32 n0;
	const u8 *arg0 = get_bytes(r, &n0);
	if (r->bad || argc == 0 || argc > 256) {
		msg_error_str(E_INVALID, "bad args");
		return;
	}
	/* Basename of args[0]. */
	const u8 *name = arg0;
	u32 nn = n0;
	for (u32 i = 0; i < n0; i++) {
		if (arg0[i] == '/') {
			name = arg0 + i + 1;
			nn = n0 - i - 1;
		}
	}
	conn.out_n = conn.err_n = 0;
	conn.status = 0;
	if (is_word(name, nn, "echo")) {
		for (u64 k = 1; k < argc; k++) {
			u32 l;
			const u8 *p = get_bytes(r, &l);
			if (r->bad)
				break;
			if (k > 1)
				out_str(proc_out, &conn.out_n, " ");
			out_append(proc_out, &conn.out_n, p, l);
		}
		out_str(proc_out, &conn.out_n, "\n");
	} else if (is_word(name, nn, "true")) {
		conn.status = 0;
	} else if (is_word(name, nn, "false")) {
		conn.status = 1;
	} else if (is_word(name, nn, "sh")) {
		u32 n1 = 0, n2 = 0;
		const u8 *a1 = argc >= 3 ? get_bytes(r, &n1) : r->p;
		const u8 *a2 = argc >= 3 ? get_bytes(r, &n2) : r->p;
		if (argc >= 3 && !r->bad && is_word(a1, n1, "-c"))
			run_script(a2, n2);
	} else {
		u8 msg[256];
		u32 m = 0;
		const char *a = "exec: \"";
		const char *b = "\": executable file not found in $PATH";
		while (*a)
			msg[m++] = (u8)*a++;
		for (u32 i = 0; i < nn && m < 160; i++)
			msg[m++] = name[i];
		while (*b)
			msg[m++] = (u8)*b++;
		msg_error(E_EXEC_NOT_FOUND, msg, m);
		return;
	}
	conn.created = 1;
	conn.pid = next_pid++;
	msg_u32(A_CREATED, conn.pid);
}

static void finish_process(void)
{
	msg_u32(A_EXITED, (u64)conn.status << 1); /* i32 zigzag */
	conn.created = 0;
	conn.started = 1;
	flush();
	send_ctrl(conn.peer_port, OP_SHUTDOWN, SHUTDOWN_BOTH);
}

/* One complete frame. Answers go to tx.data, sent by the caller's flush(). */
static void on_frame(const u8 *p, u32 n)
{
	struct reader r = { p, n, 0, 0 };
	u64 variant = get_varint(&r);
	if (r.bad) {
		msg_error_str(E_PROTOCOL, "empty frame");
		return;
	}
	if (!conn.hello) {
		if (variant != H_HELLO) {
			msg_error_str(E_PROTOCOL, "Hello must come first");
			return;
		}
		conn.hello = 1;
		msg_u32(A_HELLO, PROTOCOL_VERSION);
		return;
	}
	switch (variant) {
	case H_SYNC_TIME:
	case H_RESEED:
		msg_simple(A_ACK);
		break;
	case H_CREATE:
		on_create(&r);
		break;
	case H_START:
		if (!conn.created) {
			msg_error_str(E_PROTOCOL, "Start without a created process");
			break;
		}
		msg_u32(A_STARTED, conn.pid);
		if (conn.out_n) {
			frame_begin(A_STDOUT);
			put_bytes(proc_out, conn.out_n);
			frame_end();
		}
		if (conn.err_n) {
			frame_begin(A_STDERR);
			put_bytes(proc_err, conn.err_n);
			frame_end();
		}
		finish_process();
		break;
	case H_SIGNAL: {
		u64 z = get_varint(&r);
		u64 sig = z >> 1; /* i32 zigzag: an odd value is negative */
		if (conn.created && !r.bad && !(z & 1) && sig >= 1 && sig <= 64) {
			conn.status = (u8)(128 + sig);
			conn.out_n = conn.err_n = 0;
			finish_process();
		}
		break;
	}
	case H_STDIN:
	case H_CLOSE_STDIN:
	case H_RESIZE:
		break;
	default:
		msg_error_str(E_PROTOCOL, "not supported by the test agent");
	}
}

/* Data of the connection: reassembled into frames, each handled. */
static void on_data(const u8 *p, u32 n)
{
	conn.fwd_cnt += n;
	while (n) {
		if (conn.skip) {
			u32 k = n < conn.skip ? n : conn.skip;
			conn.skip -= k;
			p += k;
			n -= k;
			continue;
		}
		u32 room = IN_MAX - conn.in_len;
		u32 k = n < room ? n : room;
		copy(in + conn.in_len, p, k);
		conn.in_len += k;
		p += k;
		n -= k;
		u32 at = 0;
		while (conn.in_len - at >= 4) {
			u32 len = (u32)in[at] | (u32)in[at + 1] << 8 | (u32)in[at + 2] << 16 |
				  (u32)in[at + 3] << 24;
			if (len > IN_MAX - 4) {
				msg_error_str(E_INVALID, "frame too large for the test agent");
				conn.skip = len - (conn.in_len - at - 4);
				at = conn.in_len;
				break;
			}
			if (conn.in_len - at - 4 < len)
				break;
			on_frame(in + at + 4, len);
			at += 4 + len;
		}
		if (at) {
			conn.in_len -= at;
			copy(in, in + at, conn.in_len); /* forward copy: the source is ahead */
		}
	}
}

static void on_packet(const struct hdr *h, const u8 *payload, u32 n)
{
	if (h->type != TYPE_STREAM || h->dst_port != AGENT_PORT || h->src_cid != HOST_CID)
		return;
	if (h->op == OP_REQUEST) {
		memset(&conn, 0, sizeof(conn));
		conn.open = 1;
		conn.peer_port = h->src_port;
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
		on_data(payload, n);
		flush();
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
			fail("bad rx used id");
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
			fail("bad event used id");
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
			fail("no virtio-vsock device on the command line");
		if (virtio_mmio_probe(b) == VIRTIO_ID_VSOCK) {
			base = b;
			gsi = announced_gsi(bp, i);
		}
	}
	if (gsi == 0 || gsi >= IOAPIC_PINS)
		fail("no interrupt for the vsock device on the command line");
	setup_interrupts(gsi);
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
