/* hostile: a malicious virtio-mmio driver and bus prodder, for the VMM's hostile-guest campaign.
 *
 * Every choice comes from a PRNG seeded by `seed=N` on the command line, so a seed replays
 * exactly. Finds every device announced as `virtio_mmio.device=4K@0x<base>:<irq>`, sets each up
 * as a polled driver (queues of QSIZE, rings in two alternating banks so a late completion into
 * the rings of a reset device cannot be mistaken for a new one), then runs `iters=N` steps, each
 * one of:
 * - a request on a random device, often with a broken chain (loops, next out of range, indirect
 *   descriptors, addresses outside RAM or in MMIO, lengths 0/huge/wrapping, wrong directions,
 *   available index far ahead or back, heads out of range) and with device-level malice:
 *   block requests of every type (unknown ones too) with sectors past the end, bad framing, bad
 *   discard/write-zeroes segments, tiny get-id buffers; vsock packets with bad headers, lengths,
 *   ops, CIDs and ports (and well-formed ones to the host listener at `port=P`, default 5000);
 *   rng requests with odd buffers;
 * - a transport attack: bad queue sizes or ring addresses at DRIVER_OK, status bits out of order,
 *   unoffered features, out-of-range queue selects and notifies, config-space and register
 *   accesses of every width at every offset, a reset with a request in flight;
 * - random port I/O (never the i8042 reset command) or random MMIO in the 3-4 GiB gap (never the
 *   IOAPIC or LAPIC pages: KVM's own devices, which could only wedge or kill this vCPU).
 * A device the driver broke shows DEVICE_NEEDS_RESET (or stops answering): the driver resets it
 * and sets it up again.
 *
 * Writes that could land on the writable disk go only to sectors [wlo, whi) (command line;
 * default none) or must be refused (past the end, or the disk is read-only), so the host can check
 * that nothing else of the image changed. Device-writable buffers are always in the scratch area
 * (16..32 MiB) or outside RAM, so the devices never write over this guest's code or page tables.
 *
 * Output: `hostile: seed=<n> iters=<n> devices=<n>`, one `hostile: dev <i> type=<id> base=0x..`
 * per device, `hostile: ANOMALY <what> dev=<i>` for each device answer the virtio spec forbids,
 * then `hostile: summary k=v ...` and `hostile: done`; exits via i8042. */
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

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4

#define ID_BLOCK 2
#define ID_RNG 4
#define ID_VSOCK 19

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_T_DISCARD 11
#define BLK_T_WRITE_ZEROES 13
#define BLK_F_RO 5
#define BLK_F_FLUSH 9
#define BLK_F_DISCARD 13
#define BLK_F_WRITE_ZEROES 14

#define VS_OP_REQUEST 1
#define VS_OP_RW 5

#define QSIZE 16
#define MAX_DEVS 8
#define MAX_QUEUES 3

/* Scratch memory (identity-mapped, inside RAM; the guest checks RAM reaches SCRATCH_END). */
#define RING_BASE 0x1000000ULL  /* rings: (dev, queue, bank) x 16 KiB */
#define BUF_BASE 0x1100000ULL   /* request headers, status, data buffers */
#define HDR_ADDR (BUF_BASE + 0x0)
#define SEG_ADDR (BUF_BASE + 0x40)
#define STATUS_ADDR (BUF_BASE + 0x80)
#define DATA_ADDR (BUF_BASE + 0x1000) /* 4 slots of DATA_SLOT */
#define DATA_SLOT 0x20000ULL
#define FAKE_BASE 0x1200000ULL /* junk rings and indirect tables */
#define FAKE_SIZE 0x100000ULL
#define RX_BASE 0x1400000ULL /* vsock rx buffers: QSIZE x RX_BUF */
#define RX_BUF 4096
#define EVT_BASE 0x1420000ULL
#define SCRATCH_END 0x2000000ULL

#define GAP_START 0xc0000000ULL
#define VIRTIO_WINDOW 0xd0000000ULL
#define IOAPIC_PAGE 0xfec00000ULL
#define LAPIC_PAGE 0xfee00000ULL

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

struct vs_hdr {
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

_Static_assert(sizeof(struct vs_hdr) == 44, "vsock header");

struct dev {
	u64 base;
	u32 type;
	u32 nq;
	u32 bank;
	int up; /* set up and believed healthy */
	int ro;
	int discard;
	u64 capacity;
	u64 cid;
	u16 next_avail[MAX_QUEUES];
	u16 last_used[MAX_QUEUES];
};

static struct dev devs[MAX_DEVS];
static unsigned ndevs;
static u64 ram_end;
static u64 wlo, whi;
static u64 vs_port;

/* Figures for the summary line. */
static u64 n_blk, n_blk_ok, n_blk_ioerr, n_blk_unsupp, n_vsock_tx, n_vsock_rx, n_rng,
	n_rng_bytes, n_chain_attacks, n_transport, n_pio, n_mmio, n_regs, n_needs_reset, n_stalls,
	n_inits, n_init_fail, n_anomalies;

/* ---- PRNG (splitmix64) ---- */
static u64 prng;

static u64 rnd(void)
{
	u64 z = (prng += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static u64 below(u64 n)
{
	return n ? rnd() % n : 0;
}

static int chance(u64 one_in)
{
	return below(one_in) == 0;
}

/* ---- MMIO and port helpers ---- */
static inline u32 rd(const struct dev *d, u64 off)
{
	return *(volatile u32 *)(d->base + off);
}

static inline void wr(const struct dev *d, u64 off, u32 v)
{
	*(volatile u32 *)(d->base + off) = v;
}

static inline void barrier(void)
{
	__asm__ volatile("mfence" ::: "memory");
}

static u64 mmio_read(u64 addr, unsigned size)
{
	switch (size) {
	case 1:
		return *(volatile u8 *)addr;
	case 2:
		return *(volatile u16 *)addr;
	case 4:
		return *(volatile u32 *)addr;
	default:
		return *(volatile u64 *)addr;
	}
}

static void mmio_write(u64 addr, unsigned size, u64 v)
{
	switch (size) {
	case 1:
		*(volatile u8 *)addr = (u8)v;
		break;
	case 2:
		*(volatile u16 *)addr = (u16)v;
		break;
	case 4:
		*(volatile u32 *)addr = (u32)v;
		break;
	default:
		*(volatile u64 *)addr = v;
		break;
	}
}

static void port_out(u16 port, unsigned size, u32 v)
{
	if (size == 1)
		__asm__ volatile("outb %b0, %w1" : : "a"(v), "Nd"(port) : "memory");
	else if (size == 2)
		__asm__ volatile("outw %w0, %w1" : : "a"(v), "Nd"(port) : "memory");
	else
		__asm__ volatile("outl %0, %w1" : : "a"(v), "Nd"(port) : "memory");
}

static u32 port_in(u16 port, unsigned size)
{
	u32 v = 0;
	if (size == 1) {
		u8 b;
		__asm__ volatile("inb %w1, %b0" : "=a"(b) : "Nd"(port) : "memory");
		v = b;
	} else if (size == 2) {
		u16 w;
		__asm__ volatile("inw %w1, %w0" : "=a"(w) : "Nd"(port) : "memory");
		v = w;
	} else {
		__asm__ volatile("inl %w1, %0" : "=a"(v) : "Nd"(port) : "memory");
	}
	return v;
}

static unsigned rnd_size(void)
{
	return 1u << below(4); /* 1, 2, 4, 8 */
}

/* ---- rings ---- */
static u64 ring_addr(unsigned di, unsigned q, unsigned bank)
{
	return RING_BASE + (((u64)di * MAX_QUEUES + q) * 2 + bank) * 0x4000;
}

static struct desc *descs(unsigned di, unsigned q)
{
	return (struct desc *)ring_addr(di, q, devs[di].bank);
}

static struct avail *avail_of(unsigned di, unsigned q)
{
	return (struct avail *)(ring_addr(di, q, devs[di].bank) + 0x1000);
}

static struct used *used_of(unsigned di, unsigned q)
{
	return (struct used *)(ring_addr(di, q, devs[di].bank) + 0x2000);
}

static void anomaly(const char *what, unsigned di)
{
	n_anomalies++;
	put_str("hostile: ANOMALY ");
	put_str(what);
	put_str(" dev=");
	put_dec(di);
	put_char('\n');
}

static void fail(const char *what)
{
	put_str("hostile: FAIL ");
	put_str(what);
	put_char('\n');
	guest_exit();
}

/* ---- addresses and lengths ---- */

/* An address outside guest RAM (never one a device may write without harm to this guest). */
static u64 bad_addr(unsigned di)
{
	switch (below(9)) {
	case 0:
		return ram_end + below(0x1000000);
	case 1:
		return ram_end - 8; /* straddles the end of RAM with any length > 8 */
	case 2:
		return GAP_START + below(0x40000000);
	case 3:
		return devs[di].base + below(0x100); /* the device's own registers */
	case 4:
		return LAPIC_PAGE + below(0x1000);
	case 5:
		return IOAPIC_PAGE;
	case 6:
		return IDENTITY_MAP_END + below(1ULL << 40);
	case 7:
		return ~0ULL - below(0x100); /* addr + len wraps */
	default:
		return 1ULL << (40 + below(24));
	}
}

/* A buffer length: mostly ordinary, sometimes 0, odd or huge. Ordinary ones fit a data slot. */
static u32 rnd_len(void)
{
	static const u32 lens[] = {0, 1, 15, 16, 17, 44, 511, 512, 513, 1024, 4096, 65536,
				   0x7fffffff, 0x80000000, 0xfffffe00, 0xffffffff};
	if (chance(3))
		return (u32)below(8192);
	return lens[below(sizeof(lens) / sizeof(lens[0]))];
}

/* Length that keeps a buffer at `slot` inside the scratch area (or makes the chain invalid by
 * crossing the end of RAM). */
static int len_fits_slot(u32 len)
{
	return len <= DATA_SLOT || len >= 0x10000000;
}

static u64 data_addr(unsigned k)
{
	return DATA_ADDR + (u64)(k & 3) * DATA_SLOT;
}

/* ---- device set-up ---- */

static u32 status_of(const struct dev *d)
{
	return rd(d, REG_STATUS);
}

/* Announced bases: "virtio_mmio.device=<size>@0x<base>:<irq>", in order. */
static void find_devices(const u8 *bp)
{
	usize len;
	const char *c = cmdline_get(bp, &len);
	const char *key = "virtio_mmio.device=";
	for (usize i = 0; c && i + 19 < len && ndevs < MAX_DEVS; i++) {
		if (memcmp(c + i, key, 19) != 0)
			continue;
		usize j = i + 19;
		while (j < len && c[j] != '@' && c[j] != ' ')
			j++;
		if (j + 2 >= len || c[j] != '@' || c[j + 1] != '0' || c[j + 2] != 'x')
			continue;
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
		if (v < GAP_START || v >= IOAPIC_PAGE)
			continue;
		struct dev *d = &devs[ndevs];
		d->base = v;
		if (rd(d, REG_MAGIC) != 0x74726976 || rd(d, REG_VERSION) != 2)
			continue;
		d->type = rd(d, REG_DEVICE_ID);
		d->nq = d->type == ID_VSOCK ? 3 : 1;
		if (d->type != ID_BLOCK && d->type != ID_VSOCK && d->type != ID_RNG)
			continue;
		ndevs++;
	}
}

static void post_rx(unsigned di, u16 id, int malformed)
{
	struct desc *t = descs(di, 0);
	t[id].addr = RX_BASE + (u64)id * RX_BUF;
	t[id].len = RX_BUF;
	t[id].flags = F_WRITE;
	t[id].next = 0;
	if (malformed) {
		switch (below(4)) {
		case 0:
			t[id].flags = 0; /* device-readable */
			break;
		case 1:
			t[id].len = (u32)below(44); /* shorter than a header */
			break;
		case 2:
			t[id].addr = bad_addr(di);
			break;
		default:
			t[id].flags = F_WRITE | F_NEXT;
			t[id].next = id; /* a loop */
			break;
		}
	}
	struct avail *a = avail_of(di, 0);
	a->ring[devs[di].next_avail[0] % QSIZE] = id;
	devs[di].next_avail[0]++;
}

/* Gives the vsock device its rx buffers and a few event buffers. */
static void vsock_fill(unsigned di)
{
	for (u16 i = 0; i < QSIZE; i++)
		post_rx(di, i, 0);
	struct desc *e = descs(di, 2);
	struct avail *ea = avail_of(di, 2);
	for (u16 i = 0; i < 4; i++) {
		e[i].addr = EVT_BASE + i * 64ULL;
		e[i].len = 8;
		e[i].flags = F_WRITE;
		e[i].next = 0;
		ea->ring[i] = i;
	}
	devs[di].next_avail[2] = 4;
	barrier();
	avail_of(di, 0)->idx = devs[di].next_avail[0];
	ea->idx = 4;
	barrier();
	wr(&devs[di], REG_QUEUE_NOTIFY, 0);
	wr(&devs[di], REG_QUEUE_NOTIFY, 2);
}

/* Resets the device and sets it up as a correct driver would, in the other ring bank. */
static int dev_init(unsigned di)
{
	struct dev *d = &devs[di];
	n_inits++;
	d->up = 0;
	wr(d, REG_STATUS, 0);
	d->bank ^= 1;
	wr(d, REG_STATUS, S_ACK);
	wr(d, REG_STATUS, S_ACK | S_DRIVER);
	wr(d, REG_DEVICE_FEATURES_SEL, 1);
	u32 hi = rd(d, REG_DEVICE_FEATURES);
	wr(d, REG_DEVICE_FEATURES_SEL, 0);
	u32 lo = rd(d, REG_DEVICE_FEATURES);
	if (!(hi & 1)) {
		anomaly("no_version_1", di);
		return 0;
	}
	u32 want = 0;
	if (d->type == ID_BLOCK) {
		want = lo & ((1u << BLK_F_RO) | (1u << BLK_F_FLUSH) | (1u << BLK_F_DISCARD) |
			     (1u << BLK_F_WRITE_ZEROES));
		d->ro = (lo >> BLK_F_RO) & 1;
		d->discard = (lo >> BLK_F_DISCARD) & 1;
	}
	wr(d, REG_DRIVER_FEATURES_SEL, 1);
	wr(d, REG_DRIVER_FEATURES, 1);
	wr(d, REG_DRIVER_FEATURES_SEL, 0);
	wr(d, REG_DRIVER_FEATURES, want);
	wr(d, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(status_of(d) & S_FEATURES_OK)) {
		anomaly("features_ok_refused", di);
		return 0;
	}
	for (u32 q = 0; q < d->nq; q++) {
		u64 r = ring_addr(di, q, d->bank);
		memset((void *)r, 0, 0x3000);
		wr(d, REG_QUEUE_SEL, q);
		if (rd(d, REG_QUEUE_NUM_MAX) < QSIZE) {
			anomaly("queue_too_small", di);
			return 0;
		}
		wr(d, REG_QUEUE_NUM, QSIZE);
		wr(d, REG_QUEUE_DESC_LOW, (u32)r);
		wr(d, REG_QUEUE_DESC_HIGH, (u32)(r >> 32));
		wr(d, REG_QUEUE_DRIVER_LOW, (u32)(r + 0x1000));
		wr(d, REG_QUEUE_DRIVER_HIGH, 0);
		wr(d, REG_QUEUE_DEVICE_LOW, (u32)(r + 0x2000));
		wr(d, REG_QUEUE_DEVICE_HIGH, 0);
		wr(d, REG_QUEUE_READY, 1);
		d->next_avail[q] = 0;
		d->last_used[q] = 0;
	}
	wr(d, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	u32 st = status_of(d);
	if ((st & S_NEEDS_RESET) || !(st & S_DRIVER_OK)) {
		n_init_fail++;
		return 0;
	}
	if (d->type == ID_BLOCK)
		d->capacity = (u64)rd(d, REG_CONFIG) | ((u64)rd(d, REG_CONFIG + 4) << 32);
	if (d->type == ID_VSOCK) {
		d->cid = (u64)rd(d, REG_CONFIG) | ((u64)rd(d, REG_CONFIG + 4) << 32);
		vsock_fill(di);
	}
	d->up = 1;
	return 1;
}

/* ---- submitting ---- */

enum wait_result { W_USED, W_NEEDS_RESET, W_TIMEOUT };

/* Polls queue q's used ring until it moves, the device asks for a reset, or a bound passes
 * (about 50 ms of guest time; the loop thread may be slow on a loaded host, so a timeout is
 * counted, not fatal). */
static enum wait_result wait_used(unsigned di, unsigned q)
{
	struct dev *d = &devs[di];
	volatile u16 *idx = (volatile u16 *)((u64)used_of(di, q) + 2); /* used.idx */
	for (u32 spins = 0;; spins++) {
		if (*idx != d->last_used[q])
			return W_USED;
		if ((spins & 31) == 31 && (status_of(d) & S_NEEDS_RESET))
			return W_NEEDS_RESET;
		if (spins > 10000)
			return W_TIMEOUT;
		__asm__ volatile("pause");
	}
}

/* Gives the vsock device's used rx buffers back (counting packets), occasionally a broken one. */
static void drain_rx(unsigned di)
{
	struct dev *d = &devs[di];
	if (!d->up)
		return;
	struct used *u = used_of(di, 0);
	int posted = 0;
	while (*(volatile u16 *)&u->idx != d->last_used[0]) {
		barrier();
		u32 id = u->ring[d->last_used[0] % QSIZE].id;
		d->last_used[0]++;
		n_vsock_rx++;
		if (id >= QSIZE) {
			anomaly("vsock_rx_used_id", di);
			continue;
		}
		post_rx(di, (u16)id, chance(40));
		posted = 1;
	}
	if (posted) {
		barrier();
		avail_of(di, 0)->idx = d->next_avail[0];
		barrier();
		wr(d, REG_QUEUE_NOTIFY, 0);
	}
	wr(d, REG_INTERRUPT_ACK, rd(d, REG_INTERRUPT_STATUS));
}

/* Breaks the chain of `n` descriptors starting at `head` (or the ring) in one random way.
 * Returns the available index to publish. */
static u16 chain_attack(unsigned di, unsigned q, u16 head, unsigned n, u16 idx, int safe_only)
{
	struct desc *t = descs(di, q);
	struct avail *a = avail_of(di, q);
	u16 last = (u16)((head + n - 1) % QSIZE);
	u16 pick = (u16)((head + below(n)) % QSIZE);
	n_chain_attacks++;
	u64 kind = below(11);
	/* A disk write aimed at a sector must not have its data or segment swapped for other buffers
	 * (an indirect table, a zero-length buffer) that would change which sectors it reaches. */
	if (safe_only && (kind == 2 || kind == 6))
		kind = 0;
	switch (kind) {
	case 0: /* loop back to the head */
		t[last].flags |= F_NEXT;
		t[last].next = head;
		break;
	case 1: /* next outside the table */
		t[last].flags |= F_NEXT;
		t[last].next = (u16)(QSIZE + below(0x10000 - QSIZE));
		break;
	case 2: { /* an indirect descriptor (not offered) pointing at a junk table */
		u64 table = FAKE_BASE + (below(FAKE_SIZE / 2) & ~15ULL);
		struct desc *it = (struct desc *)table;
		unsigned k = (unsigned)below(6);
		for (unsigned i = 0; i < k; i++) {
			it[i].addr = chance(2) ? bad_addr(di) : data_addr(i);
			it[i].len = rnd_len();
			if (!len_fits_slot(it[i].len))
				it[i].len = 512;
			it[i].flags = (u16)(rnd() & 7);
			it[i].next = (u16)below(k + 2);
		}
		t[pick].flags |= F_INDIRECT;
		t[pick].addr = chance(4) ? bad_addr(di) : table;
		t[pick].len = chance(3) ? rnd_len() : k * 16;
		if (t[pick].addr == table && !len_fits_slot(t[pick].len))
			t[pick].len = 16;
		break;
	}
	case 3: /* available index far ahead */
		return (u16)(idx + QSIZE + 1 + below(0x8000));
	case 4: /* available index backwards */
		return (u16)(idx - 2 - below(QSIZE));
	case 5: /* head outside the table */
		a->ring[(idx - 1) % QSIZE] = (u16)(QSIZE + below(0x10000 - QSIZE));
		break;
	case 6: /* a buffer outside RAM, in MMIO, or wrapping */
		t[pick].addr = bad_addr(di);
		t[pick].len = chance(4) ? 0 : rnd_len();
		break;
	case 7: /* a huge length from inside RAM: crosses the end of RAM */
		t[pick].len = 0xffffffff - (u32)below(0x1000);
		break;
	case 8: /* direction flipped */
		t[pick].flags ^= F_WRITE;
		break;
	case 9: /* every descriptor of the table in one chain (the most a chain may hold), then a loop */
		for (u16 i = 0; i < QSIZE; i++) {
			if (i == head)
				continue;
			t[i].addr = data_addr(i);
			t[i].len = 16;
			t[i].flags = F_NEXT | F_WRITE;
			t[i].next = (u16)((i + 1) % QSIZE);
		}
		t[last].flags |= F_NEXT;
		t[last].next = (u16)((last + 1) % QSIZE);
		if (chance(2))
			t[(head + QSIZE - 1) % QSIZE].flags &= ~F_NEXT; /* exactly QSIZE long */
		break;
	default: /* two available entries for one chain */
		a->ring[idx % QSIZE] = head;
		return (u16)(idx + 1);
	}
	return idx;
}

/* Publishes chain `head` of `n` descriptors on queue q (maybe broken), notifies and waits.
 * Returns 1 with *used_len set if the device used it, 0 otherwise (device reset and set up
 * again). */
static int submit(unsigned di, unsigned q, u16 head, unsigned n, int attack, int safe_only,
		  u32 *used_len)
{
	struct dev *d = &devs[di];
	struct avail *a = avail_of(di, q);
	a->ring[d->next_avail[q] % QSIZE] = head;
	u16 idx = (u16)(d->next_avail[q] + 1);
	if (attack)
		idx = chain_attack(di, q, head, n, idx, safe_only);
	barrier();
	a->idx = idx;
	d->next_avail[q] = idx;
	barrier();
	wr(d, REG_QUEUE_NOTIFY, q);
	enum wait_result w = wait_used(di, q);
	if (w == W_USED) {
		barrier();
		struct used *u = used_of(di, q);
		struct used_elem e = u->ring[d->last_used[q] % QSIZE];
		d->last_used[q]++;
		*used_len = e.len;
		wr(d, REG_INTERRUPT_ACK, rd(d, REG_INTERRUPT_STATUS));
		if (!attack && e.id != head) {
			anomaly("used_id", di);
			dev_init(di);
			return 0;
		}
		if (attack || d->last_used[q] != d->next_avail[q])
			dev_init(di); /* the ring is no longer trusted */
		return 1;
	}
	if (w == W_NEEDS_RESET)
		n_needs_reset++;
	else
		n_stalls++;
	dev_init(di);
	return 0;
}

/* Fills descriptors head.. with the buffers in order; the last has no NEXT. */
struct buf {
	u64 addr;
	u32 len;
	u16 flags;
};

static u16 place(unsigned di, unsigned q, const struct buf *b, unsigned n)
{
	struct desc *t = descs(di, q);
	u16 head = (u16)below(QSIZE);
	for (unsigned i = 0; i < n; i++) {
		u16 at = (u16)((head + i) % QSIZE);
		t[at].addr = b[i].addr;
		t[at].len = b[i].len;
		t[at].flags = (u16)(b[i].flags | (i + 1 < n ? F_NEXT : 0));
		t[at].next = (u16)((at + 1) % QSIZE);
	}
	return head;
}

/* ---- virtio-blk ---- */

/* A sector for a request that may write `nsec` sectors: inside [wlo, whi) when it fits, else one
 * the device must refuse (past the end, straddling it, or wrapping). */
static u64 write_sector(const struct dev *d, u64 nsec, int *must_refuse)
{
	*must_refuse = 1;
	if (!d->ro && whi > wlo && nsec <= whi - wlo && whi <= d->capacity && chance(2)) {
		*must_refuse = 0;
		return wlo + below(whi - wlo - nsec + 1);
	}
	if (nsec == 0)
		return d->capacity + 1 + below(100);
	switch (below(4)) {
	case 0:
		return d->capacity + below(1000);
	case 1:
		return d->capacity - below(nsec < d->capacity ? nsec : d->capacity); /* straddles */
	case 2:
		return ~0ULL - below(nsec + 8); /* sector + nsec wraps */
	default:
		return d->capacity + (1ULL << below(63));
	}
}

static void blk_request(unsigned di)
{
	struct dev *d = &devs[di];
	static const u32 types[] = {BLK_T_IN,     BLK_T_IN,      BLK_T_OUT,     BLK_T_OUT,
				    BLK_T_FLUSH,  BLK_T_GET_ID,  BLK_T_DISCARD, BLK_T_WRITE_ZEROES,
				    2,		  3,		 5,		0x80000001};
	u32 type = chance(10) ? (u32)rnd() : types[below(sizeof(types) / sizeof(types[0]))];
	int writes = type == BLK_T_OUT || type == BLK_T_DISCARD || type == BLK_T_WRITE_ZEROES;
	struct buf b[6];
	unsigned n = 0;
	int clean = 1; /* framing the device must accept or answer with a status */
	int must_refuse = 0;

	/* header */
	b[n].addr = HDR_ADDR;
	b[n].len = 16;
	b[n].flags = 0;
	if (chance(12)) {
		b[n].len = (u32)below(33);
		if (chance(2))
			b[n].flags = F_WRITE;
	}
	n++;

	/* data */
	u64 data_len = 0;
	if (type == BLK_T_DISCARD || type == BLK_T_WRITE_ZEROES) {
		unsigned segs = chance(6) ? (unsigned)below(3) : 1;
		for (unsigned i = 0; i < segs; i++) {
			u64 seg = SEG_ADDR + 16ULL * i;
			u32 num = chance(4) ? (u32)rnd() : (u32)(1 + below(8));
			int refuse;
			u64 sector = write_sector(d, num, &refuse);
			must_refuse |= refuse;
			*(u64 *)seg = sector;
			*(u32 *)(seg + 8) = num;
			*(u32 *)(seg + 12) = chance(5) ? (u32)rnd() : (u32)below(2);
			b[n].addr = seg;
			b[n].len = chance(8) ? (u32)below(40) : 16;
			b[n].flags = chance(10) ? F_WRITE : 0;
			n++;
		}
		*(u64 *)(HDR_ADDR + 8) = rnd(); /* unused by these types */
	} else {
		unsigned k = (unsigned)below(4);
		if (type == BLK_T_IN || type == BLK_T_OUT)
			k = chance(8) ? 0 : 1 + (unsigned)below(2);
		for (unsigned i = 0; i < k; i++) {
			u32 len = chance(2) ? 512 * (u32)(1 + below(8)) : rnd_len();
			if (type == BLK_T_GET_ID && chance(2))
				len = (u32)below(24); /* tiny id buffers */
			if (!len_fits_slot(len))
				len = chance(2) ? 512 : 0xffffffff;
			b[n].addr = chance(10) ? bad_addr(di) : data_addr(i);
			b[n].len = len;
			b[n].flags = type == BLK_T_OUT ? 0 : F_WRITE;
			if (chance(10))
				b[n].flags ^= F_WRITE;
			if (b[n].flags == 0 && b[n].addr == data_addr(i) && chance(2))
				memset((void *)b[n].addr, (int)below(256), len < 4096 ? len : 4096);
			data_len += len;
			n++;
		}
		u64 sector;
		if (writes) {
			int refuse;
			sector = write_sector(d, (data_len + 511) / 512, &refuse);
			must_refuse |= refuse;
		} else {
			sector = chance(2) ? below(d->capacity + 8) : rnd();
		}
		*(u64 *)(HDR_ADDR + 8) = sector;
	}
	*(u32 *)HDR_ADDR = type;
	*(u32 *)(HDR_ADDR + 4) = (u32)(chance(8) ? rnd() : 0);
	if (d->ro && writes)
		must_refuse = 1;

	/* status */
	volatile u8 *status = (volatile u8 *)STATUS_ADDR;
	*status = 0xee;
	b[n].addr = STATUS_ADDR;
	b[n].len = 1;
	b[n].flags = F_WRITE;
	if (chance(16)) {
		clean = 0;
		switch (below(3)) {
		case 0:
			b[n].flags = 0;
			break;
		case 1:
			b[n].len = chance(2) ? 0 : 2 + (u32)below(100);
			break;
		default:
			b[n].addr = bad_addr(di);
			break;
		}
	}
	n++;

	int attack = chance(6);
	u16 head = place(di, 0, b, n);
	u32 used_len = 0;
	n_blk++;
	if (!submit(di, 0, head, n, attack, writes && !d->ro, &used_len) || attack || !clean)
		return;
	u8 s = *status;
	if (s == 0)
		n_blk_ok++;
	else if (s == 1)
		n_blk_ioerr++;
	else if (s == 2)
		n_blk_unsupp++;
	else
		anomaly("blk_status", di);
	if (s == 0 && must_refuse)
		anomaly(d->ro ? "blk_ro_write_ok" : "blk_past_end_ok", di);
}

/* ---- virtio-vsock ---- */

static void vsock_request(unsigned di)
{
	struct dev *d = &devs[di];
	static const u16 ops[] = {VS_OP_REQUEST, VS_OP_RW, VS_OP_RW, VS_OP_RW, 2, 3, 4, 6, 7, 0, 8};
	struct vs_hdr *h = (struct vs_hdr *)HDR_ADDR;
	drain_rx(di);
	h->src_cid = chance(8) ? rnd() : d->cid;
	h->dst_cid = chance(8) ? (chance(2) ? d->cid : rnd()) : 2;
	h->src_port = chance(8) ? (u32)rnd() : 100 + (u32)below(4);
	h->dst_port = chance(6) ? (u32)rnd() : (u32)(chance(4) ? vs_port + 1 : vs_port);
	h->type = chance(10) ? (u16)rnd() : 1;
	h->op = chance(12) ? (u16)rnd() : ops[below(sizeof(ops) / sizeof(ops[0]))];
	h->flags = chance(3) ? (u32)rnd() : (u32)below(4);
	h->buf_alloc = chance(4) ? (u32)rnd() : 65536;
	h->fwd_cnt = chance(4) ? (u32)rnd() : 0;

	struct buf b[4];
	unsigned n = 0;
	u32 payload = 0;
	if (chance(10)) { /* header split over two descriptors */
		u32 cut = (u32)below(44);
		b[n++] = (struct buf){HDR_ADDR, cut, 0};
		b[n++] = (struct buf){HDR_ADDR + cut, 44 - cut, 0};
	} else {
		b[n++] = (struct buf){HDR_ADDR, chance(10) ? (u32)below(100) : 44, 0};
	}
	unsigned k = h->op == VS_OP_RW ? 1 + (unsigned)below(2) : (chance(6) ? 1 : 0);
	for (unsigned i = 0; i < k; i++) {
		u32 len = chance(2) ? 1 + (u32)below(2048) : rnd_len();
		if (!len_fits_slot(len))
			len = 64;
		b[n].addr = chance(12) ? bad_addr(di) : data_addr(i);
		b[n].len = len;
		b[n].flags = chance(12) ? F_WRITE : 0;
		payload += len;
		n++;
	}
	h->len = chance(4) ? (u32)(chance(2) ? rnd() : payload + 1) : payload;
	int attack = chance(8);
	u16 head = place(di, 1, b, n);
	u32 used_len;
	n_vsock_tx++;
	submit(di, 1, head, n, attack, 0, &used_len);
	drain_rx(di);
	if (devs[di].up && chance(8)) { /* an event buffer, sometimes broken */
		struct buf e = {EVT_BASE + 0x200, 8, F_WRITE};
		if (chance(2))
			e = (struct buf){chance(2) ? bad_addr(di) : EVT_BASE + 0x200, rnd_len(), 0};
		u16 eh = place(di, 2, &e, 1);
		avail_of(di, 2)->ring[d->next_avail[2] % QSIZE] = eh;
		d->next_avail[2]++;
		barrier();
		avail_of(di, 2)->idx = d->next_avail[2];
		barrier();
		wr(d, REG_QUEUE_NOTIFY, 2);
	}
}

/* ---- virtio-rng ---- */

static void rng_request(unsigned di)
{
	struct buf b[4];
	unsigned n = 1 + (unsigned)below(4);
	u64 writable = 0;
	int clean = 1;
	for (unsigned i = 0; i < n; i++) {
		u32 len = rnd_len();
		if (!len_fits_slot(len))
			len = chance(2) ? 4096 : 0xffffffff;
		b[i].addr = data_addr(i);
		b[i].len = len;
		b[i].flags = F_WRITE;
		if (chance(10)) {
			b[i].flags = 0;
			clean = 0;
		}
		if (chance(12)) {
			b[i].addr = bad_addr(di);
			clean = 0;
		}
		if (len > DATA_SLOT)
			clean = 0;
		if (b[i].flags)
			writable += len;
	}
	int attack = chance(6);
	u16 head = place(di, 0, b, n);
	u32 used_len = 0;
	n_rng++;
	if (!submit(di, 0, head, n, attack, 0, &used_len) || attack)
		return;
	n_rng_bytes += used_len;
	if (clean && used_len > writable)
		anomaly("rng_used_len", di);
}

/* ---- transport attacks ---- */

static void rnd_register_access(unsigned di, int config)
{
	struct dev *d = &devs[di];
	unsigned size = rnd_size();
	u64 off = config ? REG_CONFIG + below(0x1000 - REG_CONFIG) : below(REG_CONFIG);
	if (chance(2))
		off &= ~(u64)(size - 1);
	if (off + size > 0x1000)
		off = 0x1000 - size;
	n_regs++;
	if (chance(2))
		(void)mmio_read(d->base + off, size);
	else
		mmio_write(d->base + off, size, chance(2) ? rnd() : below(8));
}

static void bad_queue_setup(unsigned di, int bad_size)
{
	struct dev *d = &devs[di];
	wr(d, REG_STATUS, 0);
	wr(d, REG_STATUS, S_ACK);
	wr(d, REG_STATUS, S_ACK | S_DRIVER);
	wr(d, REG_DRIVER_FEATURES_SEL, 1);
	wr(d, REG_DRIVER_FEATURES, 1);
	wr(d, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	u32 victim = (u32)below(d->nq);
	for (u32 q = 0; q < d->nq; q++) {
		u64 r = FAKE_BASE + FAKE_SIZE / 2 + q * 0x4000ULL;
		u64 desc = r, av = r + 0x1000, us = r + 0x2000;
		u32 size = QSIZE;
		if (q == victim && bad_size) {
			static const u32 sizes[] = {0, 1, 3, 17, 255, 257, 1024, 0x8000, 0xffff, 0x10010};
			size = sizes[below(sizeof(sizes) / sizeof(sizes[0]))];
		} else if (q == victim) {
			switch (below(5)) {
			case 0:
				desc = bad_addr(di);
				break;
			case 1:
				us = bad_addr(di);
				break;
			case 2:
				av = r + 1 + below(15); /* misaligned */
				break;
			case 3:
				desc = av = us = r; /* all three overlap */
				break;
			default:
				us = ram_end - 8; /* used ring across the end of RAM */
				break;
			}
		}
		wr(d, REG_QUEUE_SEL, q);
		wr(d, REG_QUEUE_NUM, size);
		wr(d, REG_QUEUE_DESC_LOW, (u32)desc);
		wr(d, REG_QUEUE_DESC_HIGH, (u32)(desc >> 32));
		wr(d, REG_QUEUE_DRIVER_LOW, (u32)av);
		wr(d, REG_QUEUE_DRIVER_HIGH, (u32)(av >> 32));
		wr(d, REG_QUEUE_DEVICE_LOW, (u32)us);
		wr(d, REG_QUEUE_DEVICE_HIGH, (u32)(us >> 32));
		wr(d, REG_QUEUE_READY, chance(12) ? (u32)rnd() : 1);
	}
	wr(d, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	(void)status_of(d);
	/* Whatever the device made of it: junk in the (fake) rings and a notify of every queue. */
	for (u32 q = 0; q < d->nq; q++) {
		u64 r = FAKE_BASE + FAKE_SIZE / 2 + q * 0x4000ULL;
		*(volatile u16 *)(r + 0x1002) = (u16)rnd(); /* avail idx */
		*(volatile u64 *)(r + below(QSIZE * 2) * 8) = rnd(); /* a descriptor word */
	}
	for (u32 q = 0; q < d->nq; q++)
		wr(d, REG_QUEUE_NOTIFY, q);
}

static void transport_attack(unsigned di)
{
	struct dev *d = &devs[di];
	n_transport++;
	switch (below(9)) {
	case 0:
		bad_queue_setup(di, 1);
		break;
	case 1:
		bad_queue_setup(di, 0);
		break;
	case 2: { /* status bits in random order */
		static const u32 bits[] = {S_ACK, S_DRIVER, S_FEATURES_OK, S_DRIVER_OK, S_FAILED,
					   S_NEEDS_RESET, 0x10, 0x20, 0x0f, 0xffffffff};
		unsigned k = 2 + (unsigned)below(6);
		u32 st = 0;
		for (unsigned i = 0; i < k; i++) {
			st = chance(3) ? (u32)rnd() : st | bits[below(sizeof(bits) / sizeof(bits[0]))];
			wr(d, REG_STATUS, st);
			(void)status_of(d);
		}
		break;
	}
	case 3: /* features the device did not offer, selects out of range, writes after FEATURES_OK */
		wr(d, REG_STATUS, 0);
		wr(d, REG_STATUS, S_ACK | S_DRIVER);
		wr(d, REG_STATUS, S_ACK);
		wr(d, REG_STATUS, S_ACK | S_DRIVER);
		for (unsigned i = 0; i < 4; i++) {
			wr(d, REG_DEVICE_FEATURES_SEL, chance(2) ? (u32)rnd() : (u32)below(4));
			(void)rd(d, REG_DEVICE_FEATURES);
			wr(d, REG_DRIVER_FEATURES_SEL, chance(2) ? (u32)rnd() : (u32)below(3));
			wr(d, REG_DRIVER_FEATURES, (u32)rnd());
		}
		wr(d, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
		wr(d, REG_DRIVER_FEATURES, (u32)rnd());
		wr(d, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
		break;
	case 4: /* queue registers with a queue select out of range, and after DRIVER_OK */
		for (unsigned i = 0; i < 6; i++) {
			wr(d, REG_QUEUE_SEL, chance(2) ? (u32)rnd() : (u32)below(6));
			(void)rd(d, REG_QUEUE_NUM_MAX);
			(void)rd(d, REG_QUEUE_READY);
			wr(d, REG_QUEUE_NUM, (u32)rnd());
			wr(d, REG_QUEUE_DESC_LOW, (u32)rnd());
			wr(d, REG_QUEUE_READY, (u32)below(3));
		}
		break;
	case 5: { /* notifies of queues that do not exist, and of real ones before DRIVER_OK */
		static const u32 qs[] = {3, 4, 15, 16, 255, 0xffff, 0x10000, 0xffffffff};
		for (unsigned i = 0; i < 4; i++)
			wr(d, REG_QUEUE_NOTIFY, chance(3) ? (u32)rnd() : qs[below(8)]);
		wr(d, REG_STATUS, 0);
		for (u32 q = 0; q < d->nq + 1; q++)
			wr(d, REG_QUEUE_NOTIFY, q);
		break;
	}
	case 6: /* config space of every width at every offset */
		for (unsigned i = 0; i < 8; i++)
			rnd_register_access(di, 1);
		break;
	case 7: /* registers of every width, aligned or not */
		for (unsigned i = 0; i < 8; i++)
			rnd_register_access(di, 0);
		break;
	default: /* a reset with a request in flight */
		if (d->up && d->type != ID_VSOCK) {
			struct buf b[3] = {{HDR_ADDR, 16, 0}, {data_addr(0), 4096, F_WRITE},
					   {STATUS_ADDR, 1, F_WRITE}};
			*(u32 *)HDR_ADDR = BLK_T_IN;
			*(u64 *)(HDR_ADDR + 8) = 0;
			unsigned n = d->type == ID_BLOCK ? 3 : 1;
			u16 head = place(di, 0, d->type == ID_BLOCK ? b : b + 1, n);
			struct avail *a = avail_of(di, 0);
			a->ring[d->next_avail[0] % QSIZE] = head;
			barrier();
			a->idx = ++d->next_avail[0];
			barrier();
			wr(d, REG_QUEUE_NOTIFY, 0);
		}
		wr(d, REG_STATUS, 0);
		break;
	}
	dev_init(di);
}

/* ---- the bus ---- */

static void pio_attack(void)
{
	static const u16 known[] = {0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff,
				    0x60,  0x61,  0x62,  0x63,	0x64,  0xf4,  0xcf8, 0xcfc,
				    0x70,  0x71,  0x80,	 0x92,	0x3f6, 0x400, 0x402, 0x510};
	for (unsigned i = 0; i < 4; i++) {
		u16 port = chance(2) ? known[below(sizeof(known) / sizeof(known[0]))] : (u16)rnd();
		unsigned size = 1u << below(3);
		u32 v = (u32)rnd();
		/* Never the i8042 reset command: it would end the run, not test anything. */
		if (port == 0x64 && (u8)v == 0xfe)
			v ^= 1;
		n_pio++;
		if (chance(2))
			(void)port_in(port, size);
		else
			port_out(port, size, v);
	}
}

/* Puts COM1 back the way lib.c's put_char expects it (8N1, no loopback, no interrupts). */
static void serial_sane(void)
{
	outb(COM1_PORT + 3, 0x03); /* LCR: DLAB off */
	outb(COM1_PORT + 1, 0x00); /* IER */
	outb(COM1_PORT + 4, 0x08); /* MCR: OUT2, no loopback */
}

static void mmio_attack(void)
{
	for (unsigned i = 0; i < 4; i++) {
		unsigned size = rnd_size();
		u64 addr;
		if (chance(3))
			addr = VIRTIO_WINDOW + below(0x10000); /* the device windows and past them */
		else
			addr = GAP_START + below(IDENTITY_MAP_END - GAP_START);
		addr &= ~(u64)(size - 1);
		/* Not the IOAPIC or the LAPIC: KVM's in-kernel devices, where random writes send
		 * NMIs/INITs to this vCPU or reroute its interrupts (a wedged guest, not a VMM test). */
		if ((addr & ~0xfffULL) == IOAPIC_PAGE || (addr & ~0xfffULL) == LAPIC_PAGE)
			continue;
		n_mmio++;
		if (chance(2))
			(void)mmio_read(addr, size);
		else
			mmio_write(addr, size, chance(2) ? rnd() : below(8));
	}
	/* A random write may have reset a device behind the driver's back; it notices on its next
	 * request (needs-reset or timeout). */
}

static void put_kv(const char *k, u64 v)
{
	put_char(' ');
	put_str(k);
	put_char('=');
	put_dec(v);
}

void guest_main(const u8 *bp)
{
	u64 seed = cmdline_u64(bp, "seed", 1);
	u64 iters = cmdline_u64(bp, "iters", 200);
	wlo = cmdline_u64(bp, "wlo", 0);
	whi = cmdline_u64(bp, "whi", 0);
	vs_port = cmdline_u64(bp, "port", 5000);
	prng = seed * 0x2545f4914f6cdd1dULL + 1;
	for (unsigned i = 0; i < cmdline_u64(bp, "skip", 0) && i < 1000; i++)
		(void)rnd();

	unsigned n = e820_count(bp);
	for (unsigned i = 0; i < n && i < E820_MAX_ENTRIES; i++) {
		struct e820_entry e = e820_get(bp, i);
		if (e.type == E820_TYPE_RAM && e.addr < IDENTITY_MAP_END && e.addr + e.size > ram_end)
			ram_end = e.addr + e.size;
	}
	if (ram_end > GAP_START)
		ram_end = GAP_START;
	if (!e820_range_is_ram(bp, RING_BASE, SCRATCH_END))
		fail("scratch area 16..32 MiB is not RAM");

	find_devices(bp);
	put_str("hostile: seed=");
	put_dec(seed);
	put_str(" iters=");
	put_dec(iters);
	put_str(" devices=");
	put_dec(ndevs);
	put_char('\n');
	if (ndevs == 0)
		fail("no virtio device");
	for (unsigned i = 0; i < ndevs; i++) {
		dev_init(i);
		put_str("hostile: dev ");
		put_dec(i);
		put_str(" type=");
		put_dec(devs[i].type);
		put_str(" base=");
		put_hex(devs[i].base);
		if (devs[i].type == ID_BLOCK) {
			put_str(" capacity=");
			put_dec(devs[i].capacity);
			put_str(devs[i].ro ? " ro" : " rw");
		}
		put_char('\n');
	}

	for (u64 it = 0; it < iters; it++) {
		unsigned di = (unsigned)below(ndevs);
		u64 r = below(20);
		if (r < 12) {
			if (!devs[di].up && !dev_init(di))
				continue;
			if (devs[di].type == ID_BLOCK)
				blk_request(di);
			else if (devs[di].type == ID_VSOCK)
				vsock_request(di);
			else
				rng_request(di);
		} else if (r < 15) {
			transport_attack(di);
		} else if (r < 17) {
			pio_attack();
		} else if (r < 19) {
			mmio_attack();
		} else {
			for (unsigned i = 0; i < 4; i++)
				rnd_register_access(di, (int)below(2));
		}
	}

	serial_sane();
	put_str("\nhostile: summary");
	put_kv("seed", seed);
	put_kv("iters", iters);
	put_kv("blk", n_blk);
	put_kv("blk_ok", n_blk_ok);
	put_kv("blk_ioerr", n_blk_ioerr);
	put_kv("blk_unsupp", n_blk_unsupp);
	put_kv("vsock_tx", n_vsock_tx);
	put_kv("vsock_rx", n_vsock_rx);
	put_kv("rng", n_rng);
	put_kv("rng_bytes", n_rng_bytes);
	put_kv("chain_attacks", n_chain_attacks);
	put_kv("transport", n_transport);
	put_kv("regs", n_regs);
	put_kv("pio", n_pio);
	put_kv("mmio", n_mmio);
	put_kv("needs_reset", n_needs_reset);
	put_kv("stalls", n_stalls);
	put_kv("inits", n_inits);
	put_kv("init_fail", n_init_fail);
	put_kv("anomalies", n_anomalies);
	put_str("\nhostile: done\n");
	guest_exit();
}
