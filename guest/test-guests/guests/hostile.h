/* The hostile test guest's shared definitions: hostile.c (PRNG, addresses, the bus, main),
 * hostile_virtio.c (driver set-up, rings, batches, chain and transport attacks) and
 * hostile_requests.c (block, vsock and rng requests). What the guest does: hostile.c. The correct
 * virtio-mmio sequences (registers, handshake, queue set-up, rings) are virtio_mmio.h's; the
 * wrong ones are written out in hostile_virtio.c. */
#ifndef HOSTILE_H
#define HOSTILE_H

#define QSIZE 16

#include "virtio_mmio.h"

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

#define VIRTIO_ID_NET 1
#define NET_HDR_LEN 12
#define NET_F_CSUM 0
#define NET_F_GUEST_CSUM 1
#define NET_F_MAC 5
#define NET_F_HOST_TSO4 11
#define NET_F_MRG_RXBUF 15
#define NET_F_STATUS 16

#define VS_OP_REQUEST 1
#define VS_OP_RW 5

#define MAX_DEVS 8
#define MAX_QUEUES 3

/* Scratch memory (identity-mapped, inside RAM; the guest checks RAM reaches SCRATCH_END). */
#define RING_BASE 0x1000000ULL  /* rings: (dev, queue, bank) x 16 KiB */
#define BUF_BASE 0x1100000ULL   /* request headers, status, data buffers */
#define HDR_BASE BUF_BASE       /* per batch slot: header, segments, status */
#define DATA_ADDR (BUF_BASE + 0x1000) /* 4 slots of DATA_SLOT */
#define DATA_SLOT 0x20000ULL
#define FAKE_BASE 0x1200000ULL /* junk rings and indirect tables */
#define FAKE_SIZE 0x100000ULL
#define RX_BASE 0x1400000ULL /* vsock rx buffers: QSIZE x RX_BUF */
#define RX_BUF 4096
#define EVT_BASE 0x1420000ULL
#define NET_RX_BASE 0x1440000ULL /* net rx buffers: QSIZE x RX_BUF */
#define SCRATCH_END 0x2000000ULL

#define GAP_START 0xc0000000ULL
#define VIRTIO_WINDOW 0xd0000000ULL
#define IOAPIC_PAGE 0xfec00000ULL
#define LAPIC_PAGE 0xfee00000ULL

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
	int mrg; /* net: VIRTIO_NET_F_MRG_RXBUF acked */
	u16 next_avail[MAX_QUEUES];
	u16 last_used[MAX_QUEUES];
};

/* Descriptors one request may use; a batch of up to MAX_BATCH fits the table. */
#define CHAIN_SPAN 5
#define MAX_BATCH 3
_Static_assert(CHAIN_SPAN * MAX_BATCH <= QSIZE, "a batch fits the descriptor table");

struct req {
	u16 head;
	u8 n;
	u8 attack;      /* its chain (or ring entry) is broken on purpose */
	u8 safe_only;   /* a disk write aimed at sectors: no attack may change its buffers */
	u8 checked;     /* framing the device must answer with a proper status */
	u8 must_refuse; /* a disk write the device must refuse */
	u8 done;
	u64 status;     /* block: where the status byte goes */
	u64 writable;   /* rng: bytes of device-writable buffers */
};

struct buf {
	u64 addr;
	u32 len;
	u16 flags;
};

/* State shared by the three files (defined in hostile.c). */
extern struct dev devs[MAX_DEVS];
extern unsigned ndevs;
extern u64 ram_end;
extern u64 wlo, whi;
extern u64 vs_port;
/* The last connection a host client opened to this guest (its REQUEST's ports). */
extern u32 vs_host_port, vs_guest_port;
/* Set by chain_attack when it rewired the whole descriptor table (other requests too). */
extern int attack_all;

/* Figures for the summary line. */
extern u64 n_vsock_rx_ops[8];
extern u64 n_stalls_by_type[4]; /* block, vsock, rng, net */
extern u64 n_late, n_reset_under, n_quiet;
extern u64 n_blk, n_blk_ok, n_blk_ioerr, n_blk_unsupp, n_vsock_tx, n_vsock_rx, n_rng,
	n_rng_bytes, n_chain_attacks, n_transport, n_pio, n_mmio, n_regs, n_needs_reset, n_stalls,
	n_inits, n_init_fail, n_anomalies, n_net_tx, n_net_rx, n_fs;

/* hostile.c: PRNG, raw accesses, addresses and lengths, reports. */
u64 rnd(void);
u64 below(u64 n);
int chance(u64 one_in);
u64 mmio_read(u64 addr, unsigned size);
void mmio_write(u64 addr, unsigned size, u64 v);
unsigned rnd_size(void);
void anomaly(const char *what, unsigned di);
u64 bad_addr(unsigned di);
u32 rnd_len(void);
int len_fits_slot(u32 len);
u64 data_addr(unsigned k);

/* hostile_virtio.c: rings, set-up, batches, chain and transport attacks. */
struct virtq_desc *descs(unsigned di, unsigned q);
struct virtq_avail *avail_of(unsigned di, unsigned q);
struct virtq_used *used_of(unsigned di, unsigned q);
int dev_init(unsigned di);
void drain_rx(unsigned di);
void net_drain(unsigned di);
u64 hdr_addr(unsigned s);
u64 seg_addr(unsigned s);
u64 status_addr(unsigned s);
void place(unsigned di, unsigned q, u16 head, const struct buf *b, unsigned n, struct req *r);
void run_batch(unsigned di, unsigned q, struct req *r, unsigned count, int wait);
void rnd_register_access(unsigned di, int config);
void transport_attack(unsigned di);

/* hostile_requests.c: block, vsock and rng requests. */
unsigned build_batch(unsigned di, struct req *r, unsigned count);
void device_requests(unsigned di);

/* Registers of device d. */
static inline u32 rd(const struct dev *d, u64 off)
{
	return virtio_mmio_rd(d->base, off);
}

static inline void wr(const struct dev *d, u64 off, u32 v)
{
	virtio_mmio_wr(d->base, off, v);
}

static inline u32 status_of(const struct dev *d)
{
	return rd(d, REG_STATUS);
}

#endif
