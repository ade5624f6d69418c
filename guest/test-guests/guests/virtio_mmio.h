/* A polled virtio-mmio (version 2) driver shared by the test guests that drive virtio devices
 * (virtioblk.c, vsock.c, the hostile guest): finding a device announced on the command line, the
 * status handshake, queue set-up, split-ring structs, publishing to the available ring and
 * polling the used ring. No interrupts: the drivers poll and acknowledge the interrupt status.
 *
 * Each helper is the plain, correct sequence of register accesses; a guest that wants a wrong one
 * (hostile_virtio.c) writes it out itself with virtio_mmio_wr().
 *
 * The including file defines QSIZE, the size of every queue it sets up, first. */
#ifndef TEST_GUESTS_VIRTIO_MMIO_H
#define TEST_GUESTS_VIRTIO_MMIO_H

#include "lib.h"

#ifndef QSIZE
#error "define QSIZE (entries per queue) before including virtio_mmio.h"
#endif

/* Registers, as offsets from the device's base (virtio 1.2, 4.2.2). */
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

#define VIRTIO_MMIO_MAGIC 0x74726976 /* "virt" */

/* Device status bits. */
#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define STATUS_NEEDS_RESET 0x40
#define STATUS_FAILED 0x80

/* VIRTIO_F_VERSION_1 (feature bit 32) in feature word 1. */
#define VIRTIO_F_VERSION_1_HI 1u

/* Device IDs. */
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_VSOCK 19
#define VIRTIO_ID_FS 26

/* Descriptor flags. */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4

/* ---- split rings (virtio 1.2, 2.7) ---- */

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
} __attribute__((packed));

struct virtq_avail {
	u16 flags;
	u16 idx;
	u16 ring[QSIZE];
	u16 used_event;
} __attribute__((packed));

struct virtq_used_elem {
	u32 id;
	u32 len;
} __attribute__((packed));

struct virtq_used {
	u16 flags;
	u16 idx;
	struct virtq_used_elem ring[QSIZE];
	u16 avail_event;
} __attribute__((packed));

/* One queue's rings, a page each. */
struct virtq {
	struct virtq_desc desc[QSIZE] __attribute__((aligned(4096)));
	struct virtq_avail avail __attribute__((aligned(4096)));
	struct virtq_used used __attribute__((aligned(4096)));
};

_Static_assert(sizeof(struct virtq) == 0x3000, "one page per ring");

static inline void barrier(void)
{
	__asm__ volatile("mfence" ::: "memory");
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause");
}

static inline void virtq_set_desc(struct virtq_desc *d, u64 addr, u32 len, u16 flags, u16 next)
{
	d->addr = addr;
	d->len = len;
	d->flags = flags;
	d->next = next;
}

/* Puts chain `head` in the available ring at *next_avail and advances it; the device sees it
 * once virtq_publish() moves the index. */
static inline void virtq_add_avail(struct virtq_avail *a, u16 *next_avail, u16 head)
{
	a->ring[*next_avail % QSIZE] = head;
	(*next_avail)++;
}

/* The used index as the device last wrote it. */
static inline u16 virtq_used_idx(const struct virtq_used *u)
{
	return *(const volatile u16 *)&u->idx;
}

/* Takes the used element at *last_used and advances it; call once virtq_used_idx() has moved
 * past *last_used. */
static inline struct virtq_used_elem virtq_take_used(const struct virtq_used *u, u16 *last_used)
{
	barrier();
	struct virtq_used_elem e = u->ring[*last_used % QSIZE];
	(*last_used)++;
	return e;
}

/* Polls the used index until it moves off `seen`: 1, or 0 after `max_spins` polls without. */
static inline int virtq_wait_used(const struct virtq_used *u, u16 seen, u64 max_spins)
{
	for (u64 spins = 0; virtq_used_idx(u) == seen; spins++) {
		if (spins > max_spins)
			return 0;
		cpu_relax();
	}
	barrier();
	return 1;
}

/* ---- registers ---- */

static inline u32 virtio_mmio_rd(u64 base, u64 off)
{
	return *(volatile u32 *)(base + off);
}

static inline void virtio_mmio_wr(u64 base, u64 off, u32 v)
{
	*(volatile u32 *)(base + off) = v;
}

static inline void virtio_mmio_notify(u64 base, u32 q)
{
	virtio_mmio_wr(base, REG_QUEUE_NOTIFY, q);
}

/* Makes available index `idx` of queue q visible (after the ring entries written before it) and
 * notifies the device. */
static inline void virtq_publish(u64 base, u32 q, struct virtq_avail *a, u16 idx)
{
	barrier();
	a->idx = idx;
	barrier();
	virtio_mmio_notify(base, q);
}

/* Reads the interrupt status and acknowledges all of it, as a driver does; returns it. */
static inline u32 virtio_mmio_ack_interrupts(u64 base)
{
	u32 isr = virtio_mmio_rd(base, REG_INTERRUPT_STATUS);
	virtio_mmio_wr(base, REG_INTERRUPT_ACK, isr);
	return isr;
}

/* A 64-bit little-endian field of the device config space, low word read first. */
static inline u64 virtio_mmio_config64(u64 base, u64 off)
{
	u64 lo = virtio_mmio_rd(base, REG_CONFIG + off);
	return lo | ((u64)virtio_mmio_rd(base, REG_CONFIG + off + 4) << 32);
}

/* ---- finding devices ---- */

#define VIRTIO_MMIO_ARG "virtio_mmio.device="
#define VIRTIO_MMIO_ARG_LEN (sizeof(VIRTIO_MMIO_ARG) - 1)

/* Offset of the next "virtio_mmio.device=" in the command line c[0..len) at or after `from`;
 * `len` if there is none. */
static inline usize virtio_mmio_next_arg(const char *c, usize len, usize from)
{
	for (usize i = from; c && i + VIRTIO_MMIO_ARG_LEN < len; i++) {
		if (memcmp(c + i, VIRTIO_MMIO_ARG, VIRTIO_MMIO_ARG_LEN) == 0)
			return i;
	}
	return len;
}

/* The hex base of the "virtio_mmio.device=<size>@0x<base>:<irq>" at c[at]; 0 if it has none. */
static inline u64 virtio_mmio_arg_base(const char *c, usize len, usize at)
{
	usize j = at + VIRTIO_MMIO_ARG_LEN;
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

/* The base of the `index`-th device announced on the command line; 0 if absent or malformed. */
static inline u64 virtio_mmio_announced_base(const u8 *bp, u64 index)
{
	usize len;
	const char *c = cmdline_get(bp, &len);
	for (usize i = virtio_mmio_next_arg(c, len, 0); i < len;
	     i = virtio_mmio_next_arg(c, len, i + 1)) {
		if (index-- == 0)
			return virtio_mmio_arg_base(c, len, i);
	}
	return 0;
}

/* The device ID at `base` (magic and version checked first); 0 if it is no virtio-mmio v2
 * device. */
static inline u32 virtio_mmio_probe(u64 base)
{
	if (virtio_mmio_rd(base, REG_MAGIC) != VIRTIO_MMIO_MAGIC ||
	    virtio_mmio_rd(base, REG_VERSION) != 2)
		return 0;
	return virtio_mmio_rd(base, REG_DEVICE_ID);
}

/* ---- set-up, in this order (virtio 1.2, 3.1.1) ---- */

/* 1. Resets the device and announces a driver: status 0, ACKNOWLEDGE, DRIVER. */
static inline void virtio_mmio_begin(u64 base)
{
	virtio_mmio_wr(base, REG_STATUS, 0);
	virtio_mmio_wr(base, REG_STATUS, STATUS_ACK);
	virtio_mmio_wr(base, REG_STATUS, STATUS_ACK | STATUS_DRIVER);
}

/* 2. Feature word `sel` (0: bits 0..31, 1: bits 32..63) the device offers. */
static inline u32 virtio_mmio_device_features(u64 base, u32 sel)
{
	virtio_mmio_wr(base, REG_DEVICE_FEATURES_SEL, sel);
	return virtio_mmio_rd(base, REG_DEVICE_FEATURES);
}

/* 3. Accepts VIRTIO_F_VERSION_1 and the features `lo` (bits 0..31), sets FEATURES_OK and reads
 * it back: 0 if the device refused the set. */
static inline int virtio_mmio_accept_features(u64 base, u32 lo)
{
	virtio_mmio_wr(base, REG_DRIVER_FEATURES_SEL, 1);
	virtio_mmio_wr(base, REG_DRIVER_FEATURES, VIRTIO_F_VERSION_1_HI);
	virtio_mmio_wr(base, REG_DRIVER_FEATURES_SEL, 0);
	virtio_mmio_wr(base, REG_DRIVER_FEATURES, lo);
	virtio_mmio_wr(base, REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
	return (virtio_mmio_rd(base, REG_STATUS) & STATUS_FEATURES_OK) != 0;
}

/* The three ring addresses of the selected queue. */
static inline void virtio_mmio_queue_rings(u64 base, u64 desc, u64 avail, u64 used)
{
	virtio_mmio_wr(base, REG_QUEUE_DESC_LOW, (u32)desc);
	virtio_mmio_wr(base, REG_QUEUE_DESC_HIGH, (u32)(desc >> 32));
	virtio_mmio_wr(base, REG_QUEUE_DRIVER_LOW, (u32)avail);
	virtio_mmio_wr(base, REG_QUEUE_DRIVER_HIGH, (u32)(avail >> 32));
	virtio_mmio_wr(base, REG_QUEUE_DEVICE_LOW, (u32)used);
	virtio_mmio_wr(base, REG_QUEUE_DEVICE_HIGH, (u32)(used >> 32));
}

/* 4. Sets up queue q with QSIZE entries in the given rings and marks it ready; 0 (and nothing
 * written after QueueNumMax) if the device's queue is smaller. */
static inline int virtio_mmio_setup_queue(u64 base, u32 q, struct virtq_desc *desc,
					  struct virtq_avail *avail, struct virtq_used *used)
{
	virtio_mmio_wr(base, REG_QUEUE_SEL, q);
	if (virtio_mmio_rd(base, REG_QUEUE_NUM_MAX) < QSIZE)
		return 0;
	virtio_mmio_wr(base, REG_QUEUE_NUM, QSIZE);
	virtio_mmio_queue_rings(base, (u64)desc, (u64)avail, (u64)used);
	virtio_mmio_wr(base, REG_QUEUE_READY, 1);
	return 1;
}

/* 5. DRIVER_OK: the device is live. */
static inline void virtio_mmio_driver_ok(u64 base)
{
	virtio_mmio_wr(base, REG_STATUS,
		       STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
}

#endif
