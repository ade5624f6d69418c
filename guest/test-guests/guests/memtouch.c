/* memtouch: writes one 64-bit value per 4 KiB page of a RAM range, signals
 * READY, then reads everything back and verifies it.
 *
 * With `clone=1` (for clones of one template), after the read-back it waits
 * for one byte B on the serial port, fills the first page of the range with
 * B (a page every clone shares with the template until it writes it), checks
 * every byte of that page reads back as B, prints `memtouch: clone B ok`,
 * then waits for one more byte before exiting (so the host can measure the
 * clones while they are all alive). */
#include "algo.h"
#include "lib.h"
#include "params.h"

#define MIB (1ULL << 20)
#define PAGE_SIZE 4096ULL
/* The guest image, stack, zero page and the VMM's page tables live below
 * this; touching it would corrupt the guest. */
#define LOW_RESERVED_END (8 * MIB)

void guest_main(const u8 *bp)
{
	u64 mib = cmdline_u64(bp, "touch_mib", MEMTOUCH_DEFAULT_TOUCH_MIB);
	u64 base_mib = cmdline_u64(bp, "touch_base_mib",
				   MEMTOUCH_DEFAULT_TOUCH_BASE_MIB);
	u64 base, end, pages, sum = 0;

	/* Both limited to 4 GiB so the products cannot overflow. */
	if (mib > 4096 || base_mib > 4096 || base_mib + mib > 4096) {
		put_str("memtouch: range not in RAM\n");
		guest_exit();
	}
	base = base_mib * MIB;
	end = base + mib * MIB;
	pages = mib * MIB / PAGE_SIZE;
	if (mib != 0 && base < LOW_RESERVED_END) {
		put_str("memtouch: range overlaps guest image\n");
		guest_exit();
	}
	if (!e820_range_is_ram(bp, base, end)) {
		put_str("memtouch: range not in RAM\n");
		guest_exit();
	}

	/* Phase 1: write. */
	for (u64 idx = 0; idx < pages; idx++) {
		volatile u64 *p = (volatile u64 *)(usize)(
			base + idx * PAGE_SIZE + memtouch_offset(idx));
		*p = memtouch_value(idx);
	}
	put_str("memtouch: wrote ");
	put_dec(pages);
	put_str(" pages\n");

	/* Phase 2: READY (the VMM may snapshot here; phase 3 then runs in the
	 * original and/or a restored copy). */
	signal_ready();
	put_str("memtouch: ready\n");

	/* Phase 3: read back and verify. */
	for (u64 idx = 0; idx < pages; idx++) {
		volatile u64 *p = (volatile u64 *)(usize)(
			base + idx * PAGE_SIZE + memtouch_offset(idx));
		u64 v = *p;
		if (v != memtouch_value(idx)) {
			put_str("memtouch: FAIL page=");
			put_dec(idx);
			put_char('\n');
			guest_exit();
		}
		sum = memtouch_mix(sum, v);
	}
	put_str("memtouch: verified ");
	put_dec(pages);
	put_str(" pages checksum=");
	put_hex(sum);
	put_char('\n');
	put_str("memtouch: OK\n");
	if (cmdline_u64(bp, "clone", 0) == 1 && pages > 0) {
		u8 b = serial_getc();
		volatile u8 *page = (volatile u8 *)(usize)base;
		for (u64 i = 0; i < PAGE_SIZE; i++)
			page[i] = b;
		for (u64 i = 0; i < PAGE_SIZE; i++) {
			if (page[i] != b) {
				put_str("memtouch: clone FAIL\n");
				guest_exit();
			}
		}
		put_str("memtouch: clone ");
		put_dec(b);
		put_str(" ok\n");
		(void)serial_getc();
	}
	guest_exit();
}
