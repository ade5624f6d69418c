/* virtioblk: a small polled virtio-blk driver over virtio-mmio (version 2).
 *
 * Finds the device at the address the VMM announced (`virtio_mmio.device=4K@0x<base>:<irq>` on the
 * command line; the `disk_index=N`-th one, default 0), negotiates VIRTIO_F_VERSION_1 only, sets up queue 0 with 8 descriptors, then:
 * reads the capacity, reads sector 0 and prints its first 16 bytes, writes sector 1 with a
 * pattern (sector number `write_sector=N`, default 1), reads it back, flushes, asks for the disk
 * id, and exits via i8042. Every step prints one line; the host checks the backing file.
 * Polls the used ring (no interrupts), with a bounded wait. */
#define QSIZE 8

#include "virtio_mmio.h"

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8

struct blk_req {
	u32 type;
	u32 reserved;
	u64 sector;
} __attribute__((packed));

static struct virtq_desc descs[QSIZE] __attribute__((aligned(4096)));
static struct virtq_avail avail __attribute__((aligned(4096)));
static struct virtq_used used __attribute__((aligned(4096)));
static struct blk_req req __attribute__((aligned(16)));
static u8 data[512] __attribute__((aligned(512)));
static volatile u8 status;
static u64 base;

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
	virtq_set_desc(&descs[0], (u64)&req, sizeof(req), VIRTQ_DESC_F_NEXT, 1);
	u16 st = 1;
	if (with_data) {
		virtq_set_desc(&descs[1], (u64)data, data_len,
			       VIRTQ_DESC_F_NEXT | (data_writable ? VIRTQ_DESC_F_WRITE : 0), 2);
		st = 2;
	}
	virtq_set_desc(&descs[st], (u64)&status, 1, VIRTQ_DESC_F_WRITE, 0);
	u16 seen = virtq_used_idx(&used);
	virtq_add_avail(&avail, &next_avail, 0);
	virtq_publish(base, 0, &avail, next_avail);
	if (!virtq_wait_used(&used, seen, 2000000))
		fail("timeout waiting for the used ring");
	/* Acknowledge the interrupt the device raised, as a driver would. */
	virtio_mmio_ack_interrupts(base);
	return status;
}

void guest_main(const u8 *bp)
{
	base = virtio_mmio_announced_base(bp, cmdline_u64(bp, "disk_index", 0));
	if (base == 0)
		fail("no virtio_mmio.device= on the command line");
	put_str("virtioblk: base=");
	put_hex(base);
	put_char('\n');
	if (virtio_mmio_probe(base) != VIRTIO_ID_BLOCK)
		fail("not a virtio-mmio v2 block device");

	virtio_mmio_begin(base);
	u32 hi = virtio_mmio_device_features(base, 1);
	u32 lo = virtio_mmio_device_features(base, 0);
	int ro = (lo >> 5) & 1; /* VIRTIO_BLK_F_RO */
	if (!(hi & VIRTIO_F_VERSION_1_HI))
		fail("device does not offer VIRTIO_F_VERSION_1");
	if (!virtio_mmio_accept_features(base, ro ? (1u << 5) : 0))
		fail("FEATURES_OK refused");
	if (!virtio_mmio_setup_queue(base, 0, descs, &avail, &used))
		fail("queue too small");
	virtio_mmio_driver_ok(base);

	u64 capacity = virtio_mmio_config64(base, 0);
	put_str("virtioblk: capacity=");
	put_dec(capacity);
	put_str(ro ? " ro\n" : " rw\n");
	if (cmdline_has(bp, "ready_after_probe")) {
		/* A template: snapshot here; a restore may back the (spare) disk with a file, which
		 * the device announces with a config-change interrupt. */
		signal_ready();
		u32 isr = virtio_mmio_ack_interrupts(base);
		capacity = virtio_mmio_config64(base, 0);
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
