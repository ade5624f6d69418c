/* virtioblk: a small polled virtio-blk driver over virtio-mmio (version 2).
 *
 * Finds the device at the address the VMM announced (`virtio_mmio.device=4K@0x<base>:<irq>` on the
 * command line; the `disk_index=N`-th one, default 0), negotiates VIRTIO_F_VERSION_1 only, sets up queue 0 with 8 descriptors, then:
 * reads the capacity, reads sector 0 and prints its first 16 bytes, writes sector 1 with a
 * pattern (sector number `write_sector=N`, default 1), reads it back, flushes, asks for the disk
 * id, and exits via i8042. Every step prints one line; the host checks the backing file.
 * Polls the used ring (no interrupts), with a bounded wait. */
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

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8

#define QSIZE 8

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

struct blk_req {
	u32 type;
	u32 reserved;
	u64 sector;
} __attribute__((packed));

static struct desc descs[QSIZE] __attribute__((aligned(4096)));
static struct avail avail __attribute__((aligned(4096)));
static struct used used __attribute__((aligned(4096)));
static struct blk_req req __attribute__((aligned(16)));
static u8 data[512] __attribute__((aligned(512)));
static volatile u8 status;
static u64 base;

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

/* Parses the hex base of the `index`-th "virtio_mmio.device=...@0x<base>" in the cmdline; 0 if
 * absent. */
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
	put_str("virtioblk: FAIL ");
	put_str(what);
	put_char('\n');
	guest_exit();
}

/* Submits the chain header -> [data] -> status and waits for it; returns the status byte. */
static u8 submit(u32 type, u64 sector, int with_data, int data_writable, u32 data_len)
{
	static u16 next_avail;
	req.type = type;
	req.reserved = 0;
	req.sector = sector;
	status = 0xff;
	descs[0].addr = (u64)&req;
	descs[0].len = sizeof(req);
	descs[0].flags = VIRTQ_DESC_F_NEXT;
	descs[0].next = 1;
	u16 st = 1;
	if (with_data) {
		descs[1].addr = (u64)data;
		descs[1].len = data_len;
		descs[1].flags = VIRTQ_DESC_F_NEXT | (data_writable ? VIRTQ_DESC_F_WRITE : 0);
		descs[1].next = 2;
		st = 2;
	}
	descs[st].addr = (u64)&status;
	descs[st].len = 1;
	descs[st].flags = VIRTQ_DESC_F_WRITE;
	descs[st].next = 0;
	u16 seen = used.idx;
	avail.ring[next_avail % QSIZE] = 0;
	barrier();
	next_avail++;
	avail.idx = next_avail;
	barrier();
	wr(REG_QUEUE_NOTIFY, 0);
	for (u64 spins = 0; *(volatile u16 *)&used.idx == seen; spins++) {
		if (spins > 2000000)
			fail("timeout waiting for the used ring");
		__asm__ volatile("pause");
	}
	barrier();
	/* Acknowledge the interrupt the device raised, as a driver would. */
	wr(REG_INTERRUPT_ACK, rd(REG_INTERRUPT_STATUS));
	return status;
}

void guest_main(const u8 *bp)
{
	base = announced_base(bp, cmdline_u64(bp, "disk_index", 0));
	if (base == 0)
		fail("no virtio_mmio.device= on the command line");
	put_str("virtioblk: base=");
	put_hex(base);
	put_char('\n');
	if (rd(REG_MAGIC) != 0x74726976 || rd(REG_VERSION) != 2 || rd(REG_DEVICE_ID) != 2)
		fail("not a virtio-mmio v2 block device");

	wr(REG_STATUS, 0);
	wr(REG_STATUS, STATUS_ACK);
	wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
	wr(REG_DEVICE_FEATURES_SEL, 1);
	u32 hi = rd(REG_DEVICE_FEATURES);
	wr(REG_DEVICE_FEATURES_SEL, 0);
	u32 lo = rd(REG_DEVICE_FEATURES);
	int ro = (lo >> 5) & 1; /* VIRTIO_BLK_F_RO */
	if (!(hi & 1))
		fail("device does not offer VIRTIO_F_VERSION_1");
	wr(REG_DRIVER_FEATURES_SEL, 1);
	wr(REG_DRIVER_FEATURES, 1);
	wr(REG_DRIVER_FEATURES_SEL, 0);
	wr(REG_DRIVER_FEATURES, ro ? (1u << 5) : 0);
	wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(rd(REG_STATUS) & STATUS_FEATURES_OK))
		fail("FEATURES_OK refused");

	wr(REG_QUEUE_SEL, 0);
	if (rd(REG_QUEUE_NUM_MAX) < QSIZE)
		fail("queue too small");
	wr(REG_QUEUE_NUM, QSIZE);
	wr(REG_QUEUE_DESC_LOW, (u32)(u64)descs);
	wr(REG_QUEUE_DESC_HIGH, (u32)((u64)descs >> 32));
	wr(REG_QUEUE_DRIVER_LOW, (u32)(u64)&avail);
	wr(REG_QUEUE_DRIVER_HIGH, (u32)((u64)&avail >> 32));
	wr(REG_QUEUE_DEVICE_LOW, (u32)(u64)&used);
	wr(REG_QUEUE_DEVICE_HIGH, (u32)((u64)&used >> 32));
	wr(REG_QUEUE_READY, 1);
	wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);

	u64 capacity = (u64)rd(REG_CONFIG) | ((u64)rd(REG_CONFIG + 4) << 32);
	put_str("virtioblk: capacity=");
	put_dec(capacity);
	put_str(ro ? " ro\n" : " rw\n");
	if (cmdline_has(bp, "ready_after_probe")) {
		/* A template: snapshot here; a restore may back the (spare) disk with a file, which
		 * the device announces with a config-change interrupt. */
		signal_ready();
		u32 isr = rd(REG_INTERRUPT_STATUS);
		wr(REG_INTERRUPT_ACK, isr);
		capacity = (u64)rd(REG_CONFIG) | ((u64)rd(REG_CONFIG + 4) << 32);
		put_str("virtioblk: after ready: capacity=");
		put_dec(capacity);
		put_str((isr & 2) ? " config-changed\n" : "\n");
	}

	u8 s = submit(BLK_T_IN, 0, 1, 1, 512);
	put_str("virtioblk: read sector 0 status=");
	put_dec(s);
	put_str(" data=");
	for (int i = 0; i < 16 && data[i] >= 0x20 && data[i] < 0x7f; i++)
		put_char((char)data[i]);
	put_char('\n');

	u64 sector = cmdline_u64(bp, "write_sector", 1);
	for (int i = 0; i < 512; i++)
		data[i] = (u8)(i * 7 + sector);
	memcpy(data, "KATA-SNAP-WROTE!", 16);
	s = submit(BLK_T_OUT, sector, 1, 0, 512);
	put_str("virtioblk: write sector ");
	put_dec(sector);
	put_str(" status=");
	put_dec(s);
	put_char('\n');
	if (cmdline_has(bp, "ready_after_write")) {
		/* Snapshot between two writes: a restore must keep the first and take the second. */
		signal_ready();
		for (int i = 0; i < 512; i++)
			data[i] = (u8)(i * 7 + sector + 1);
		memcpy(data, "KATA-SNAP-WROTE!", 16);
		s = submit(BLK_T_OUT, sector + 1, 1, 0, 512);
		put_str("virtioblk: write sector ");
		put_dec(sector + 1);
		put_str(" status=");
		put_dec(s);
		put_char('\n');
		for (int i = 0; i < 512; i++)
			data[i] = (u8)(i * 7 + sector);
		memcpy(data, "KATA-SNAP-WROTE!", 16);
	}

	memset(data, 0, sizeof(data));
	s = submit(BLK_T_IN, sector, 1, 1, 512);
	int same = memcmp(data, "KATA-SNAP-WROTE!", 16) == 0;
	for (int i = 16; i < 512; i++)
		same &= data[i] == (u8)(i * 7 + sector);
	put_str("virtioblk: read back status=");
	put_dec(s);
	put_str(same ? " match\n" : " differs\n");

	s = submit(BLK_T_FLUSH, 0, 0, 0, 0);
	put_str("virtioblk: flush status=");
	put_dec(s);
	put_char('\n');

	memset(data, 0, 21);
	s = submit(BLK_T_GET_ID, 0, 1, 1, 20);
	put_str("virtioblk: id status=");
	put_dec(s);
	put_str(" id=");
	for (int i = 0; i < 20 && data[i]; i++)
		put_char((char)data[i]);
	put_char('\n');

	s = submit(BLK_T_IN, capacity, 1, 1, 512);
	put_str("virtioblk: read past end status=");
	put_dec(s);
	put_char('\n');
	put_str("virtioblk: done\n");
	guest_exit();
}
