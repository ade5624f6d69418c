/* hostile: what goes into the requests. Block requests of every type with sectors that are
 * either inside the writable window or must be refused, vsock packets with bad and good headers,
 * rng requests with odd buffers; each may be marked for a chain attack. */
#include "hostile.h"

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

static void blk_build(unsigned di, unsigned slot, u16 head, struct req *r)
{
	struct dev *d = &devs[di];
	static const u32 types[] = {BLK_T_IN,     BLK_T_IN,      BLK_T_OUT,     BLK_T_OUT,
				    BLK_T_FLUSH,  BLK_T_GET_ID,  BLK_T_DISCARD, BLK_T_WRITE_ZEROES,
				    2,		  3,		 5,		0x80000001};
	u32 type = chance(10) ? (u32)rnd() : types[below(sizeof(types) / sizeof(types[0]))];
	int writes = type == BLK_T_OUT || type == BLK_T_DISCARD || type == BLK_T_WRITE_ZEROES;
	u64 hdr = hdr_addr(slot);
	struct buf b[CHAIN_SPAN];
	unsigned n = 0;
	int must_refuse = 0;
	r->checked = 1;

	b[n].addr = hdr;
	b[n].len = 16;
	b[n].flags = 0;
	if (chance(12)) {
		b[n].len = (u32)below(33);
		if (chance(2))
			b[n].flags = VIRTQ_DESC_F_WRITE;
	}
	n++;

	if (type == BLK_T_DISCARD || type == BLK_T_WRITE_ZEROES) {
		unsigned segs = chance(6) ? (unsigned)below(3) : 1;
		for (unsigned i = 0; i < segs; i++) {
			u64 seg = seg_addr(slot) + 16ULL * i;
			u32 num = chance(4) ? (u32)rnd() : (u32)(1 + below(8));
			int refuse;
			*(u64 *)seg = write_sector(d, num, &refuse);
			must_refuse |= refuse;
			*(u32 *)(seg + 8) = num;
			*(u32 *)(seg + 12) = chance(5) ? (u32)rnd() : (u32)below(2);
			b[n].addr = seg;
			b[n].len = chance(8) ? (u32)below(40) : 16;
			b[n].flags = chance(10) ? VIRTQ_DESC_F_WRITE : 0;
			n++;
		}
		*(u64 *)(hdr + 8) = rnd(); /* unused by these types */
	} else {
		unsigned k = (unsigned)below(4);
		if (type == BLK_T_IN || type == BLK_T_OUT)
			k = chance(8) ? 0 : 1 + (unsigned)below(2);
		u64 data_len = 0;
		for (unsigned i = 0; i < k; i++) {
			u32 len = chance(2) ? 512 * (u32)(1 + below(8)) : rnd_len();
			if (type == BLK_T_GET_ID && chance(2))
				len = (u32)below(24); /* tiny id buffers */
			if (!len_fits_slot(len))
				len = chance(2) ? 512 : 0xffffffff;
			b[n].addr = chance(10) ? bad_addr(di) : data_addr(i);
			b[n].len = len;
			b[n].flags = type == BLK_T_OUT ? 0 : VIRTQ_DESC_F_WRITE;
			if (chance(10))
				b[n].flags ^= VIRTQ_DESC_F_WRITE;
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
		*(u64 *)(hdr + 8) = sector;
	}
	*(u32 *)hdr = type;
	*(u32 *)(hdr + 4) = (u32)(chance(8) ? rnd() : 0);

	r->status = status_addr(slot);
	*(volatile u8 *)r->status = 0xee;
	b[n].addr = r->status;
	b[n].len = 1;
	b[n].flags = VIRTQ_DESC_F_WRITE;
	if (chance(16)) {
		r->checked = 0;
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
	r->must_refuse = (u8)(must_refuse || (d->ro && writes));
	r->safe_only = (u8)(writes && !d->ro);
	r->attack = (u8)chance(6);
	place(di, 0, head, b, n, r);
	n_blk++;
}

/* ---- virtio-vsock ---- */

static void vsock_build(unsigned di, unsigned slot, u16 head, struct req *r)
{
	struct dev *d = &devs[di];
	static const u16 ops[] = {VS_OP_REQUEST, VS_OP_RW, VS_OP_RW, VS_OP_RW, 2, 3, 4, 6, 7, 0, 8};
	struct vs_hdr *h = (struct vs_hdr *)hdr_addr(slot);
	h->src_cid = chance(8) ? rnd() : d->cid;
	h->dst_cid = chance(8) ? (chance(2) ? d->cid : rnd()) : 2;
	h->src_port = chance(8) ? (u32)rnd() : 100 + (u32)below(4);
	h->dst_port = chance(6) ? (u32)rnd() : (u32)(chance(4) ? vs_port + 1 : vs_port);
	int reply = chance(3); /* drawn either way: the seed's choices must not depend on timing */
	if (vs_host_port && reply) { /* the connection a host client opened */
		h->src_port = vs_guest_port;
		h->dst_port = vs_host_port;
	}
	h->type = chance(10) ? (u16)rnd() : 1;
	h->op = chance(12) ? (u16)rnd() : ops[below(sizeof(ops) / sizeof(ops[0]))];
	h->flags = chance(3) ? (u32)rnd() : (u32)below(4);
	h->buf_alloc = chance(4) ? (u32)rnd() : 65536;
	h->fwd_cnt = chance(4) ? (u32)rnd() : 0;
	int proper = chance(3);
	if (proper) { /* a well-formed packet on a few connections, so connected paths run too */
		static const u16 proper_ops[] = {VS_OP_REQUEST, VS_OP_RW, VS_OP_RW, VS_OP_RW, 4, 6, 7};
		h->src_cid = d->cid;
		h->dst_cid = 2;
		h->type = 1;
		h->op = proper_ops[below(sizeof(proper_ops) / sizeof(proper_ops[0]))];
		if (vs_host_port && reply) {
			h->src_port = vs_guest_port;
			h->dst_port = vs_host_port;
		} else {
			h->src_port = 100 + (u32)below(2);
			h->dst_port = (u32)vs_port;
		}
		h->flags = h->op == 4 ? 1 + (u32)below(3) : 0;
	}

	struct buf b[CHAIN_SPAN];
	unsigned n = 0;
	u32 payload = 0;
	if (proper) {
		b[n++] = (struct buf){(u64)h, 44, 0};
	} else if (chance(10)) { /* header split over two descriptors */
		u32 cut = (u32)below(44);
		b[n++] = (struct buf){(u64)h, cut, 0};
		b[n++] = (struct buf){(u64)h + cut, 44 - cut, 0};
	} else {
		b[n++] = (struct buf){(u64)h, chance(10) ? (u32)below(100) : 44, 0};
	}
	unsigned k = h->op == VS_OP_RW ? 1 + (unsigned)below(2) : (chance(6) ? 1 : 0);
	for (unsigned i = 0; i < k; i++) {
		u32 len = chance(2) ? 1 + (u32)below(2048) : rnd_len();
		if (!len_fits_slot(len))
			len = 64;
		b[n].addr = chance(12) && !proper ? bad_addr(di) : data_addr(i);
		b[n].len = len;
		b[n].flags = chance(12) && !proper ? VIRTQ_DESC_F_WRITE : 0;
		payload += len;
		n++;
	}
	h->len = chance(4) && !proper ? (u32)(chance(2) ? rnd() : payload + 1) : payload;
	r->attack = (u8)(!proper && chance(8));
	place(di, 1, head, b, n, r);
	n_vsock_tx++;
}

/* Posts an event-queue buffer, sometimes a broken one. */
static void vsock_event_buffer(unsigned di)
{
	struct dev *d = &devs[di];
	struct buf e = {EVT_BASE + 0x200, 8, VIRTQ_DESC_F_WRITE};
	if (chance(2))
		e = (struct buf){chance(2) ? bad_addr(di) : EVT_BASE + 0x200, rnd_len(), 0};
	struct req r = {0};
	place(di, 2, (u16)below(QSIZE), &e, 1, &r);
	virtq_add_avail(avail_of(di, 2), &d->next_avail[2], r.head);
	virtq_publish(d->base, 2, avail_of(di, 2), d->next_avail[2]);
}

/* ---- virtio-rng ---- */

static void rng_build(unsigned di, unsigned slot, u16 head, struct req *r)
{
	struct buf b[4];
	unsigned n = 1 + (unsigned)below(4);
	(void)slot;
	r->checked = 1;
	for (unsigned i = 0; i < n; i++) {
		u32 len = rnd_len();
		if (!len_fits_slot(len))
			len = chance(2) ? 4096 : 0xffffffff;
		b[i].addr = data_addr(i);
		b[i].len = len;
		b[i].flags = VIRTQ_DESC_F_WRITE;
		if (chance(10)) {
			b[i].flags = 0;
			r->checked = 0;
		}
		if (chance(12)) {
			b[i].addr = bad_addr(di);
			r->checked = 0;
		}
		if (len > DATA_SLOT)
			r->checked = 0;
		if (b[i].flags)
			r->writable += len;
	}
	r->attack = (u8)chance(6);
	place(di, 0, head, b, n, r);
	n_rng++;
}

/* ---- virtio-net ---- */

/* A transmit chain: the 12-byte header (sometimes split, short, or with random offload fields)
 * and a frame; sometimes device-writable buffers, buffers outside RAM, or lengths past the cap. */
static void net_build(unsigned di, unsigned slot, u16 head, struct req *r)
{
	u8 *h = (u8 *)hdr_addr(slot);
	memset(h, 0, NET_HDR_LEN);
	if (chance(4)) {
		/* flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: anything */
		for (unsigned i = 0; i < 10; i++)
			h[i] = (u8)rnd();
	}
	struct buf b[CHAIN_SPAN];
	unsigned n = 0;
	int proper = chance(3);
	if (!proper && chance(8)) {
		u32 cut = (u32)below(NET_HDR_LEN);
		b[n++] = (struct buf){(u64)h, cut, 0};
		b[n++] = (struct buf){(u64)h + cut, NET_HDR_LEN - cut, 0};
	} else {
		b[n++] = (struct buf){(u64)h, proper || !chance(8) ? NET_HDR_LEN : (u32)below(40), 0};
	}
	unsigned k = 1 + (unsigned)below(2);
	for (unsigned i = 0; i < k && n < CHAIN_SPAN; i++) {
		u32 len = chance(2) ? 14 + (u32)below(1500) : rnd_len();
		if (!len_fits_slot(len))
			len = proper ? 60 : len;
		b[n].addr = chance(12) && !proper ? bad_addr(di) : data_addr(i);
		b[n].len = len;
		b[n].flags = chance(12) && !proper ? VIRTQ_DESC_F_WRITE : 0;
		n++;
	}
	r->checked = 1;
	r->attack = (u8)(!proper && chance(8));
	place(di, 1, head, b, n, r);
	n_net_tx++;
}

/* virtio-fs: a FUSE request (40-byte header with a random opcode, node and length, then random
 * bytes, a NUL-terminated name now and then) and reply buffers, on the request queue. */
static void fs_build(unsigned di, unsigned slot, u16 head, struct req *r)
{
	struct buf b[4];
	unsigned n = 0;
	u64 in = data_addr(0);
	u32 in_len = chance(8) ? rnd_len() : 40 + (u32)below(300);
	if (!len_fits_slot(in_len))
		in_len = chance(2) ? 4096 : 0xffffffff;
	volatile u8 *p = (volatile u8 *)in;
	if (in_len <= DATA_SLOT) {
		for (u32 i = 0; i < in_len && i < 512; i++)
			p[i] = chance(3) ? 0 : (u8)rnd();
		/* len, opcode (1..50), unique, nodeid (mostly the root or small), uid, gid, pid */
		*(volatile u32 *)(p + 0) = chance(4) ? (u32)rnd() : in_len;
		*(volatile u32 *)(p + 4) = 1 + (u32)below(50);
		*(volatile u64 *)(p + 8) = rnd();
		*(volatile u64 *)(p + 16) = chance(2) ? 1 : below(8);
		if (in_len > 44 && chance(2)) {
			p[40] = chance(2) ? '.' : 'a';
			p[41] = chance(2) ? '.' : 0;
			p[42] = 0;
		}
	}
	(void)slot;
	r->checked = 1;
	b[n].addr = chance(12) ? bad_addr(di) : in;
	b[n].len = in_len;
	b[n].flags = 0;
	n++;
	unsigned outs = (unsigned)below(3);
	for (unsigned i = 0; i < outs; i++) {
		u32 len = chance(4) ? rnd_len() : 16 + (u32)below(4096);
		if (!len_fits_slot(len))
			len = 4096;
		b[n].addr = chance(12) ? bad_addr(di) : data_addr(1 + i);
		b[n].len = len;
		b[n].flags = VIRTQ_DESC_F_WRITE;
		r->writable += len;
		n++;
	}
	r->attack = (u8)chance(6);
	place(di, 1, head, b, n, r);
	n_fs++;
}

/* Builds `count` requests for device di in the batch slots, at random but disjoint places of
 * the descriptor table; returns the queue they go on. */
unsigned build_batch(unsigned di, struct req *r, unsigned count)
{
	u16 base = (u16)below(QSIZE);
	memset(r, 0, sizeof(*r) * count);
	for (unsigned i = 0; i < count; i++) {
		u16 head = (u16)((base + i * CHAIN_SPAN) % QSIZE);
		if (devs[di].type == VIRTIO_ID_BLOCK)
			blk_build(di, i, head, &r[i]);
		else if (devs[di].type == VIRTIO_ID_VSOCK)
			vsock_build(di, i, head, &r[i]);
		else if (devs[di].type == VIRTIO_ID_NET)
			net_build(di, i, head, &r[i]);
		else if (devs[di].type == VIRTIO_ID_FS)
			fs_build(di, i, head, &r[i]);
		else
			rng_build(di, i, head, &r[i]);
	}
	return devs[di].type == VIRTIO_ID_VSOCK || devs[di].type == VIRTIO_ID_NET ||
			       devs[di].type == VIRTIO_ID_FS
		       ? 1
		       : 0;
}

/* One step: a batch of 1..MAX_BATCH requests on a device, answers checked. */
void device_requests(unsigned di)
{
	struct req r[MAX_BATCH];
	unsigned count = chance(3) ? 1 + (unsigned)below(MAX_BATCH) : 1;
	if (devs[di].type == VIRTIO_ID_VSOCK)
		drain_rx(di);
	if (devs[di].type == VIRTIO_ID_NET)
		net_drain(di);
	unsigned q = build_batch(di, r, count);
	run_batch(di, q, r, count, 1);
	if (devs[di].type == VIRTIO_ID_VSOCK) {
		drain_rx(di);
		if (devs[di].up && chance(8))
			vsock_event_buffer(di);
	}
	if (devs[di].type == VIRTIO_ID_NET)
		net_drain(di);
}
