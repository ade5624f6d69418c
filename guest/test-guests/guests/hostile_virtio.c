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

static struct virtq *vq_of(unsigned di, unsigned q, unsigned bank)
{
	return (struct virtq *)ring_addr(di, q, bank);
}

struct virtq_desc *descs(unsigned di, unsigned q)
{
	return vq_of(di, q, devs[di].bank)->desc;
}

struct virtq_avail *avail_of(unsigned di, unsigned q)
{
	return &vq_of(di, q, devs[di].bank)->avail;
}

struct virtq_used *used_of(unsigned di, unsigned q)
{
	return &vq_of(di, q, devs[di].bank)->used;
}

/* ---- device set-up ---- */

static u64 rx_prng = 1;

/* Puts rx buffer `id` back; `broken` 1..4 breaks it in one of four ways (0: a good one). */
static void post_rx(unsigned di, u16 id, u64 broken)
{
	struct virtq_desc *t = descs(di, 0);
	u64 base = devs[di].type == VIRTIO_ID_NET ? NET_RX_BASE : RX_BASE;
	virtq_set_desc(&t[id], base + (u64)id * RX_BUF, RX_BUF, VIRTQ_DESC_F_WRITE, 0);
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
		t[id].flags = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT;
		t[id].next = id; /* a loop */
		break;
	}
	virtq_add_avail(avail_of(di, 0), &devs[di].next_avail[0], id);
}

/* Gives the vsock device its rx buffers and a few event buffers. */
static void vsock_fill(unsigned di)
{
	for (u16 i = 0; i < QSIZE; i++)
		post_rx(di, i, 0);
	struct virtq_desc *e = descs(di, 2);
	struct virtq_avail *ea = avail_of(di, 2);
	for (u16 i = 0; i < 4; i++) {
		virtq_set_desc(&e[i], EVT_BASE + i * 64ULL, 8, VIRTQ_DESC_F_WRITE, 0);
		ea->ring[i] = i;
	}
	devs[di].next_avail[2] = 4;
	/* Both queues published, then both notified. */
	barrier();
	avail_of(di, 0)->idx = devs[di].next_avail[0];
	ea->idx = 4;
	barrier();
	virtio_mmio_notify(devs[di].base, 0);
	virtio_mmio_notify(devs[di].base, 2);
}

/* Gives the net device its rx buffers. */
static void net_fill(unsigned di)
{
	for (u16 i = 0; i < QSIZE; i++)
		post_rx(di, i, 0);
	virtq_publish(devs[di].base, 0, avail_of(di, 0), devs[di].next_avail[0]);
}

/* Takes the frames the net device delivered (checking what the spec promises of them) and
 * gives their buffers back, sometimes broken. */
void net_drain(unsigned di)
{
	struct dev *d = &devs[di];
	if (!d->up)
		return;
	struct virtq_used *u = used_of(di, 0);
	int posted = 0;
	while (virtq_used_idx(u) != d->last_used[0]) {
		struct virtq_used_elem e = virtq_take_used(u, &d->last_used[0]);
		n_net_rx++;
		if (e.id >= QSIZE) {
			anomaly("net_rx_used_id", di);
			continue;
		}
		const u8 *h = (const u8 *)(NET_RX_BASE + (u64)e.id * RX_BUF);
		u16 nbuf = (u16)(h[10] | (h[11] << 8));
		if (e.len > RX_BUF || e.len < NET_HDR_LEN || (!d->mrg && nbuf != 1))
			anomaly("net_rx_frame", di);
		rx_prng = rx_prng * 6364136223846793005ULL + 1442695040888963407ULL;
		u64 pick = (rx_prng >> 33) % 160;
		post_rx(di, (u16)e.id, pick < 4 ? pick + 1 : 0);
		posted = 1;
	}
	if (posted)
		virtq_publish(d->base, 0, avail_of(di, 0), d->next_avail[0]);
	virtio_mmio_ack_interrupts(d->base);
}

/* Resets the device and sets it up as a correct driver would, in the other ring bank. */
int dev_init(unsigned di)
{
	struct dev *d = &devs[di];
	n_inits++;
	d->up = 0;
	d->bank ^= 1;
	virtio_mmio_begin(d->base);
	u32 hi = virtio_mmio_device_features(d->base, 1);
	u32 lo = virtio_mmio_device_features(d->base, 0);
	if (!(hi & VIRTIO_F_VERSION_1_HI)) {
		anomaly("no_version_1", di);
		return 0;
	}
	u32 want = 0;
	if (d->type == VIRTIO_ID_BLOCK) {
		want = lo & ((1u << BLK_F_RO) | (1u << BLK_F_FLUSH) | (1u << BLK_F_DISCARD) |
			     (1u << BLK_F_WRITE_ZEROES));
		d->ro = (lo >> BLK_F_RO) & 1;
		d->discard = (lo >> BLK_F_DISCARD) & 1;
	}
	if (d->type == VIRTIO_ID_NET) {
		/* A random set of what it offers: offloads, mergeable buffers or not. */
		u32 some = (1u << NET_F_CSUM) | (1u << NET_F_GUEST_CSUM) | (1u << NET_F_MAC) |
			   (1u << NET_F_HOST_TSO4) | (1u << NET_F_MRG_RXBUF) | (1u << NET_F_STATUS);
		want = lo & some & (u32)rnd();
		d->mrg = (want >> NET_F_MRG_RXBUF) & 1;
	}
	if (!virtio_mmio_accept_features(d->base, want)) {
		anomaly("features_ok_refused", di);
		return 0;
	}
	for (u32 q = 0; q < d->nq; q++) {
		struct virtq *vq = vq_of(di, q, d->bank);
		memset(vq, 0, sizeof(*vq));
		if (!virtio_mmio_setup_queue(d->base, q, vq->desc, &vq->avail, &vq->used)) {
			anomaly("queue_too_small", di);
			return 0;
		}
		d->next_avail[q] = 0;
		d->last_used[q] = 0;
	}
	virtio_mmio_driver_ok(d->base);
	u32 st = status_of(d);
	if ((st & STATUS_NEEDS_RESET) || !(st & STATUS_DRIVER_OK)) {
		n_init_fail++;
		return 0;
	}
	if (d->type == VIRTIO_ID_BLOCK)
		d->capacity = virtio_mmio_config64(d->base, 0);
	if (d->type == VIRTIO_ID_VSOCK) {
		d->cid = virtio_mmio_config64(d->base, 0);
		vsock_fill(di);
	}
	if (d->type == VIRTIO_ID_NET)
		net_fill(di);
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
	const struct virtq_used *u = used_of(di, q);
	u64 start = rdtsc();
	for (u64 spins = 0;; spins++) {
		if (virtq_used_idx(u) != d->last_used[q]) {
			if (rdtsc() - start > LATE_TSC)
				n_late++;
			return W_USED;
		}
		if ((spins & 31) == 31) {
			u32 st = status_of(d);
			if (st & STATUS_NEEDS_RESET)
				return W_NEEDS_RESET;
			if (!(st & STATUS_DRIVER_OK))
				return W_RESET_UNDER;
			if (rdtsc() - start > limit || spins > 100000000)
				return W_TIMEOUT;
		}
		cpu_relax();
	}
}

/* Gives the vsock device's used rx buffers back (counting packets), occasionally a broken one. */
void drain_rx(unsigned di)
{
	struct dev *d = &devs[di];
	if (!d->up)
		return;
	struct virtq_used *u = used_of(di, 0);
	int posted = 0;
	while (virtq_used_idx(u) != d->last_used[0]) {
		u32 id = virtq_take_used(u, &d->last_used[0]).id;
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
	if (posted)
		virtq_publish(d->base, 0, avail_of(di, 0), d->next_avail[0]);
	virtio_mmio_ack_interrupts(d->base);
}

/* Breaks the chain of `n` descriptors starting at `head` (or the ring) in one random way.
 * Returns the available index to publish. */
static u16 chain_attack(unsigned di, unsigned q, u16 head, unsigned n, u16 idx, int safe_only)
{
	struct virtq_desc *t = descs(di, q);
	struct virtq_avail *a = avail_of(di, q);
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
		t[last].flags |= VIRTQ_DESC_F_NEXT;
		t[last].next = head;
		break;
	case 1: /* next outside the table */
		t[last].flags |= VIRTQ_DESC_F_NEXT;
		t[last].next = (u16)(QSIZE + below(0x10000 - QSIZE));
		break;
	case 2: { /* an indirect descriptor (not offered) pointing at a junk table */
		u64 table = FAKE_BASE + (below(FAKE_SIZE / 2) & ~15ULL);
		struct virtq_desc *it = (struct virtq_desc *)table;
		unsigned k = (unsigned)below(6);
		for (unsigned i = 0; i < k; i++) {
			it[i].addr = chance(2) ? bad_addr(di) : data_addr(i);
			it[i].len = rnd_len();
			if (!len_fits_slot(it[i].len))
				it[i].len = 512;
			it[i].flags = (u16)(rnd() & 7);
			it[i].next = (u16)below(k + 2);
		}
		t[pick].flags |= VIRTQ_DESC_F_INDIRECT;
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
		t[pick].flags ^= VIRTQ_DESC_F_WRITE;
		break;
	case 9: /* every descriptor of the table in one chain (the most a chain may hold), then a loop */
		attack_all = 1;
		for (u16 i = 0; i < QSIZE; i++) {
			if (i == head)
				continue;
			u16 flags = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE;
			virtq_set_desc(&t[i], data_addr(i), 16, flags, (u16)((i + 1) % QSIZE));
		}
		t[last].flags |= VIRTQ_DESC_F_NEXT;
		t[last].next = (u16)((last + 1) % QSIZE);
		if (chance(2))
			/* exactly QSIZE long */
			t[(head + QSIZE - 1) % QSIZE].flags &= ~VIRTQ_DESC_F_NEXT;
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
	struct virtq_desc *t = descs(di, q);
	for (unsigned i = 0; i < n; i++) {
		u16 at = (u16)((head + i) % QSIZE);
		virtq_set_desc(&t[at], b[i].addr, b[i].len,
			       (u16)(b[i].flags | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0)),
			       (u16)((at + 1) % QSIZE));
	}
	r->head = head;
	r->n = (u8)n;
}

static void check_answer(unsigned di, struct req *r, u32 used_len)
{
	const struct dev *d = &devs[di];
	if (d->type == VIRTIO_ID_BLOCK) {
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
	} else if (d->type == VIRTIO_ID_RNG) {
		n_rng_bytes += used_len;
		if (used_len > r->writable)
			anomaly("rng_used_len", di);
	} else if (d->type == VIRTIO_ID_FS) {
		/* A FUSE reply fits the reply buffers; no reply is used length 0. */
		if (used_len > r->writable)
			anomaly("fs_used_len", di);
	} else if (d->type == VIRTIO_ID_NET) {
		/* The device writes nothing into a transmit chain. */
		if (used_len != 0)
			anomaly("net_tx_used_len", di);
	}
}

/* Publishes the batch r[0..count) on queue q (breaking what is marked), notifies once, and waits
 * for every answer; checks the answers of requests nobody broke. A device that asks for a reset
 * or stops answering is reset and set up again, as is one whose ring was broken. */
void run_batch(unsigned di, unsigned q, struct req *r, unsigned count, int wait)
{
	struct dev *d = &devs[di];
	struct virtq_avail *a = avail_of(di, q);
	u16 idx = d->next_avail[q];
	int attacked = 0;
	attack_all = 0;
	for (unsigned i = 0; i < count; i++) {
		virtq_add_avail(a, &idx, r[i].head);
		if (r[i].attack) {
			idx = chain_attack(di, q, r[i].head, r[i].n, idx, r[i].safe_only);
			attacked = 1;
		}
	}
	d->next_avail[q] = idx;
	virtq_publish(d->base, q, a, idx);
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
				n_stalls_by_type[d->type == VIRTIO_ID_BLOCK	 ? 0
						 : d->type == VIRTIO_ID_VSOCK ? 1
						 : d->type == VIRTIO_ID_NET   ? 3
									      : 2]++;
				put_str("hostile: stall dev=");
				put_dec(di);
				put_str(" q=");
				put_dec(q);
				put_str(" batch=");
				put_dec(count);
				put_str(" got=");
				put_dec(got);
				if (d->type == VIRTIO_ID_BLOCK) {
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
		struct virtq_used_elem e = virtq_take_used(used_of(di, q), &d->last_used[q]);
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
	virtio_mmio_ack_interrupts(d->base);
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
	virtio_mmio_begin(d->base);
	/* VERSION_1 only, without reading the offer; no FEATURES_OK check. */
	wr(d, REG_DRIVER_FEATURES_SEL, 1);
	wr(d, REG_DRIVER_FEATURES, 1);
	wr(d, REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
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
		wr(d, REG_QUEUE_NUM, size); /* QueueNumMax unread */
		virtio_mmio_queue_rings(d->base, desc, av, us);
		wr(d, REG_QUEUE_READY, chance(12) ? (u32)rnd() : 1);
	}
	virtio_mmio_driver_ok(d->base);
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
		static const u32 bits[] = {STATUS_ACK, STATUS_DRIVER, STATUS_FEATURES_OK,
					   STATUS_DRIVER_OK, STATUS_FAILED, STATUS_NEEDS_RESET,
					   0x10, 0x20, 0x0f, 0xffffffff};
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
		wr(d, REG_STATUS, STATUS_ACK | STATUS_DRIVER);
		wr(d, REG_STATUS, STATUS_ACK);
		wr(d, REG_STATUS, STATUS_ACK | STATUS_DRIVER);
		for (unsigned i = 0; i < 4; i++) {
			wr(d, REG_DEVICE_FEATURES_SEL, chance(2) ? (u32)rnd() : (u32)below(4));
			(void)rd(d, REG_DEVICE_FEATURES);
			wr(d, REG_DRIVER_FEATURES_SEL, chance(2) ? (u32)rnd() : (u32)below(3));
			wr(d, REG_DRIVER_FEATURES, (u32)rnd());
		}
		wr(d, REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
		wr(d, REG_DRIVER_FEATURES, (u32)rnd());
		wr(d, REG_STATUS,
		   STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
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
