/* hostile: a malicious virtio-mmio driver and bus prodder, for the VMM's hostile-guest campaign.
 *
 * Every choice comes from a PRNG seeded by `seed=N` on the command line, so a seed replays the
 * same steps (as long as the devices answer the same way: a timeout is timing). Finds every device announced as `virtio_mmio.device=4K@0x<base>:<irq>`, sets each up
 * as a polled driver (queues of QSIZE, rings in two alternating banks so a late completion into
 * the rings of a reset device cannot be mistaken for a new one), then runs `iters=N` steps, each
 * one of:
 * - a request on a random device, often with a broken chain (loops, next out of range, indirect
 *   descriptors, addresses outside RAM or in MMIO, lengths 0/huge/wrapping, wrong directions,
 *   available index far ahead or back, heads out of range) and with device-level malice:
 *   block requests of every type (unknown ones too) with sectors past the end, bad framing, bad
 *   discard/write-zeroes segments, tiny get-id buffers; vsock packets with bad headers, lengths,
 *   ops, CIDs and ports (and well-formed ones to the host listener at `port=P`, default 5000);
 *   rng requests with odd buffers; net transmit chains with random headers, split or short
 *   headers, frames of any length, device-writable buffers (receive buffers are re-posted,
 *   sometimes broken, as for vsock);
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
#include "hostile.h"

struct dev devs[MAX_DEVS];
unsigned ndevs;
u64 ram_end;
u64 wlo, whi;
u64 vs_port;
/* The last connection a host client opened to this guest (its REQUEST's ports). */
u32 vs_host_port, vs_guest_port;
/* Set by chain_attack when it rewired the whole descriptor table (other requests too). */
int attack_all;

/* Figures for the summary line. */
u64 n_vsock_rx_ops[8];
u64 n_stalls_by_type[4];
u64 n_late, n_reset_under, n_quiet;
u64 n_blk, n_blk_ok, n_blk_ioerr, n_blk_unsupp, n_vsock_tx, n_vsock_rx, n_rng,
	n_rng_bytes, n_chain_attacks, n_transport, n_pio, n_mmio, n_regs, n_needs_reset, n_stalls,
	n_inits, n_init_fail, n_anomalies, n_net_tx, n_net_rx, n_fs;

/* ---- PRNG (splitmix64) ---- */
u64 prng;

u64 rnd(void)
{
	u64 z = (prng += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

u64 below(u64 n)
{
	return n ? rnd() % n : 0;
}

int chance(u64 one_in)
{
	return below(one_in) == 0;
}

u64 mmio_read(u64 addr, unsigned size)
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

void mmio_write(u64 addr, unsigned size, u64 v)
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

void port_out(u16 port, unsigned size, u32 v)
{
	if (size == 1)
		__asm__ volatile("outb %b0, %w1" : : "a"(v), "Nd"(port) : "memory");
	else if (size == 2)
		__asm__ volatile("outw %w0, %w1" : : "a"(v), "Nd"(port) : "memory");
	else
		__asm__ volatile("outl %0, %w1" : : "a"(v), "Nd"(port) : "memory");
}

u32 port_in(u16 port, unsigned size)
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

unsigned rnd_size(void)
{
	return 1u << below(4); /* 1, 2, 4, 8 */
}

void anomaly(const char *what, unsigned di)
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
u64 bad_addr(unsigned di)
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
u32 rnd_len(void)
{
	static const u32 lens[] = {0, 1, 15, 16, 17, 44, 511, 512, 513, 1024, 4096, 65536,
				   0x7fffffff, 0x80000000, 0xfffffe00, 0xffffffff};
	if (chance(3))
		return (u32)below(8192);
	return lens[below(sizeof(lens) / sizeof(lens[0]))];
}

/* Length that keeps a buffer at `slot` inside the scratch area (or makes the chain invalid by
 * crossing the end of RAM). */
int len_fits_slot(u32 len)
{
	return len <= DATA_SLOT || len >= 0x10000000;
}

u64 data_addr(unsigned k)
{
	return DATA_ADDR + (u64)(k & 3) * DATA_SLOT;
}

/* ---- devices ---- */

static void find_devices(const u8 *bp)
{
	usize len;
	const char *c = cmdline_get(bp, &len);
	for (usize i = virtio_mmio_next_arg(c, len, 0); i < len && ndevs < MAX_DEVS;
	     i = virtio_mmio_next_arg(c, len, i + 1)) {
		u64 v = virtio_mmio_arg_base(c, len, i);
		if (v < GAP_START || v >= IOAPIC_PAGE)
			continue;
		struct dev *d = &devs[ndevs];
		d->base = v;
		d->type = virtio_mmio_probe(v);
		d->nq = d->type == VIRTIO_ID_VSOCK			       ? 3
			: d->type == VIRTIO_ID_NET || d->type == VIRTIO_ID_FS ? 2
									      : 1;
		if (d->type != VIRTIO_ID_BLOCK && d->type != VIRTIO_ID_VSOCK &&
		    d->type != VIRTIO_ID_RNG && d->type != VIRTIO_ID_NET && d->type != VIRTIO_ID_FS)
			continue;
		ndevs++;
	}
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
		if (devs[i].type == VIRTIO_ID_BLOCK) {
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
			device_requests(di);
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
	put_kv("vsock_rx_request", n_vsock_rx_ops[VS_OP_REQUEST]);
	put_kv("vsock_rx_response", n_vsock_rx_ops[2]);
	put_kv("vsock_rx_rst", n_vsock_rx_ops[3]);
	put_kv("vsock_rx_rw", n_vsock_rx_ops[VS_OP_RW]);
	put_kv("net_tx", n_net_tx);
	put_kv("net_rx", n_net_rx);
	put_kv("rng", n_rng);
	put_kv("fs", n_fs);
	put_kv("rng_bytes", n_rng_bytes);
	put_kv("chain_attacks", n_chain_attacks);
	put_kv("transport", n_transport);
	put_kv("regs", n_regs);
	put_kv("pio", n_pio);
	put_kv("mmio", n_mmio);
	put_kv("needs_reset", n_needs_reset);
	put_kv("late", n_late);
	put_kv("reset_under", n_reset_under);
	put_kv("quiet", n_quiet);
	put_kv("stalls", n_stalls);
	put_kv("stalls_blk", n_stalls_by_type[0]);
	put_kv("stalls_vsock", n_stalls_by_type[1]);
	put_kv("stalls_rng", n_stalls_by_type[2]);
	put_kv("stalls_net", n_stalls_by_type[3]);
	put_kv("inits", n_inits);
	put_kv("init_fail", n_init_fail);
	put_kv("anomalies", n_anomalies);
	put_str("\nhostile: done\n");
	guest_exit();
}
