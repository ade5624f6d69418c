/* hostile: the virtio-mmio driver half. Sets devices up as a correct driver would, publishes
 * batches of requests (breaking chains and rings on purpose), waits for and checks the answers,
 * resets a device that asks for it or stops answering, and attacks the transport (queue set-up,
 * status and feature sequences, selects, notifies, register and config accesses). */
#include "hostile.h"

/* ---- rings ---- */
static u64 ring_addr(unsigned di, unsigned q, unsigned bank)
{
	return RING_BASE + (((u64)di * MAX_QUEUES + q) * 2 + bank) * 0x4000;
}

struct desc *descs(unsigned di, unsigned q)
{
	return (struct desc *)ring_addr(di, q, devs[di].bank);
}

struct avail *avail_of(unsigned di, unsigned q)
{
	return (struct avail *)(ring_addr(di, q, devs[di].bank) + 0x1000);
}

struct used *used_of(unsigned di, unsigned q)
{
	return (struct used *)(ring_addr(di, q, devs[di].bank) + 0x2000);
}

/* ---- device set-up ---- */

static u64 rx_prng = 1;

/* Puts rx buffer `id` back; `broken` 1..4 breaks it in one of four ways (0: a good one). */
static void post_rx(unsigned di, u16 id, u64 broken)
{
	struct desc *t = descs(di, 0);
	t[id].addr = RX_BASE + (u64)id * RX_BUF;
	t[id].len = RX_BUF;
	t[id].flags = F_WRITE;
	t[id].next = 0;
	switch (broken) {
	case 0:
		break;
	case 1:
		t[id].flags = 0; /* device-readable */
		break;
	case 2:
		t[id].len = (u32)(broken * 7); /* shorter than a header */
		break;
	case 3:
		t[id].addr = ram_end - 8; /* across the end of RAM */
		break;
	default:
		t[id].flags = F_WRITE | F_NEXT;
		t[id].next = id; /* a loop */
		break;
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
int dev_init(unsigned di)
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

enum wait_result { W_USED, W_NEEDS_RESET, W_RESET_UNDER, W_TIMEOUT };

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* TSC ticks (a few GHz): an answer later than LATE_TSC (~0.1 s) is late; none by LOST_TSC (about
 * 10 s) to well-formed requests from a device that is still live is a lost request. A batch with
 * a broken chain or ring may rightly get no answer (an available index moved back publishes
 * nothing): it waits QUIET_TSC (~0.2 s). */
#define LATE_TSC 300000000ULL
#define LOST_TSC 25000000000ULL
#define QUIET_TSC 500000000ULL

/* Polls queue q's used ring until it moves, the device asks for a reset or was reset behind the
 * driver's back (a random register write), or `limit` TSC ticks pass. */
static enum wait_result wait_used(unsigned di, unsigned q, u64 limit)
{
	struct dev *d = &devs[di];
	volatile u16 *idx = (volatile u16 *)((u64)used_of(di, q) + 2); /* used.idx */
	u64 start = rdtsc();
	for (u64 spins = 0;; spins++) {
		if (*idx != d->last_used[q]) {
			if (rdtsc() - start > LATE_TSC)
				n_late++;
			return W_USED;
		}
		if ((spins & 31) == 31) {
			u32 st = status_of(d);
			if (st & S_NEEDS_RESET)
				return W_NEEDS_RESET;
			if (!(st & S_DRIVER_OK))
				return W_RESET_UNDER;
			if (rdtsc() - start > limit || spins > 100000000)
				return W_TIMEOUT;
		}
		__asm__ volatile("pause");
	}
}

/* Gives the vsock device's used rx buffers back (counting packets), occasionally a broken one. */
void drain_rx(unsigned di)
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
		struct vs_hdr *h = (struct vs_hdr *)(RX_BASE + (u64)id * RX_BUF);
		n_vsock_rx_ops[h->op < 8 ? h->op : 0]++;
		if (h->op == VS_OP_REQUEST) {
			vs_host_port = h->src_port;
			vs_guest_port = h->dst_port;
		}
		/* How many packets arrive depends on timing: their choices come from a stream of
		 * their own, so the main one stays the same for a seed. */
		rx_prng = rx_prng * 6364136223846793005ULL + 1442695040888963407ULL;
		u64 pick = (rx_prng >> 33) % 160;
		post_rx(di, (u16)id, pick < 4 ? pick + 1 : 0);
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
		attack_all = 1;
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

/* ---- batches ---- */

/* Per-request header, discard segments and status byte: slot `s` of a batch. */
u64 hdr_addr(unsigned s)
{
	return HDR_BASE + (u64)s * 0x100;
}

u64 seg_addr(unsigned s)
{
	return hdr_addr(s) + 0x40;
}

u64 status_addr(unsigned s)
{
	return hdr_addr(s) + 0x80;
}

/* One request of a batch. */

/* Writes buffers b[0..n) as one chain starting at descriptor `head` (wrapping); the last has no
 * NEXT. */
void place(unsigned di, unsigned q, u16 head, const struct buf *b, unsigned n, struct req *r)
{
	struct desc *t = descs(di, q);
	for (unsigned i = 0; i < n; i++) {
		u16 at = (u16)((head + i) % QSIZE);
		t[at].addr = b[i].addr;
		t[at].len = b[i].len;
		t[at].flags = (u16)(b[i].flags | (i + 1 < n ? F_NEXT : 0));
		t[at].next = (u16)((at + 1) % QSIZE);
	}
	r->head = head;
	r->n = (u8)n;
}

static void check_answer(unsigned di, struct req *r, u32 used_len)
{
	const struct dev *d = &devs[di];
	if (d->type == ID_BLOCK) {
		u8 s = *(volatile u8 *)r->status;
		if (s == 0)
			n_blk_ok++;
		else if (s == 1)
			n_blk_ioerr++;
		else if (s == 2)
			n_blk_unsupp++;
		else
			anomaly("blk_status", di);
		if (s == 0 && r->must_refuse)
			anomaly(d->ro ? "blk_ro_write_ok" : "blk_past_end_ok", di);
	} else if (d->type == ID_RNG) {
		n_rng_bytes += used_len;
		if (used_len > r->writable)
			anomaly("rng_used_len", di);
	}
}

/* Publishes the batch r[0..count) on queue q (breaking what is marked), notifies once, and waits
 * for every answer; checks the answers of requests nobody broke. A device that asks for a reset
 * or stops answering is reset and set up again, as is one whose ring was broken. */
void run_batch(unsigned di, unsigned q, struct req *r, unsigned count, int wait)
{
	struct dev *d = &devs[di];
	struct avail *a = avail_of(di, q);
	u16 idx = d->next_avail[q];
	int attacked = 0;
	attack_all = 0;
	for (unsigned i = 0; i < count; i++) {
		a->ring[idx % QSIZE] = r[i].head;
		idx++;
		if (r[i].attack) {
			idx = chain_attack(di, q, r[i].head, r[i].n, idx, r[i].safe_only);
			attacked = 1;
		}
	}
	barrier();
	a->idx = idx;
	d->next_avail[q] = idx;
	barrier();
	wr(d, REG_QUEUE_NOTIFY, q);
	if (!wait)
		return;
	for (unsigned got = 0; got < count; got++) {
		enum wait_result w = wait_used(di, q, attacked ? QUIET_TSC : LOST_TSC);
		if (w != W_USED) {
			if (w == W_NEEDS_RESET) {
				n_needs_reset++;
			} else if (w == W_RESET_UNDER) {
				n_reset_under++;
			} else if (attacked) {
				n_quiet++;
			} else {
				/* A live device that left well-formed requests unanswered for seconds. */
				n_stalls++;
				n_stalls_by_type[d->type == ID_BLOCK ? 0 : d->type == ID_VSOCK ? 1 : 2]++;
				put_str("hostile: stall dev=");
				put_dec(di);
				put_str(" q=");
				put_dec(q);
				put_str(" batch=");
				put_dec(count);
				put_str(" got=");
				put_dec(got);
				if (d->type == ID_BLOCK) {
					put_str(" types=");
					for (unsigned i = 0; i < count; i++) {
						put_dec(*(volatile u32 *)hdr_addr(i));
						put_char(r[i].done ? '+' : '-');
					}
				}
				put_char('\n');
			}
			dev_init(di);
			return;
		}
		barrier();
		struct used_elem e = used_of(di, q)->ring[d->last_used[q] % QSIZE];
		d->last_used[q]++;
		struct req *m = 0;
		for (unsigned i = 0; i < count && !m; i++)
			if (r[i].head == e.id && !r[i].done)
				m = &r[i];
		if (!m) {
			if (!attacked)
				anomaly("used_id", di);
			continue;
		}
		m->done = 1;
		if (!m->attack && m->checked && !attack_all)
			check_answer(di, m, e.len);
	}
	wr(d, REG_INTERRUPT_ACK, rd(d, REG_INTERRUPT_STATUS));
	if (attacked || d->last_used[q] != d->next_avail[q])
		dev_init(di); /* the ring is no longer trusted */
}

/* ---- transport attacks ---- */

void rnd_register_access(unsigned di, int config)
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

void transport_attack(unsigned di)
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
	default: /* a reset with requests in flight */
		if (d->up) {
			struct req r[MAX_BATCH];
			unsigned count = 1 + (unsigned)below(MAX_BATCH);
			unsigned q = build_batch(di, r, count);
			run_batch(di, q, r, count, 0);
		}
		wr(d, REG_STATUS, 0);
		break;
	}
	dev_init(di);
}
