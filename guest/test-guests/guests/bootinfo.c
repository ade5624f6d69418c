/* bootinfo: echoes the cmdline and the e820 map from boot_params. */
#include "lib.h"

void guest_main(const u8 *bp)
{
	usize len;
	const char *cmdline = cmdline_get(bp, &len);
	unsigned n = e820_count(bp);

	put_str("cmdline: ");
	for (usize i = 0; i < len; i++)
		put_char(cmdline[i]);
	put_char('\n');

	if (n > E820_MAX_ENTRIES) {
		put_str("bootinfo: bad e820 count\n");
		guest_exit();
	}
	put_str("e820 entries: ");
	put_dec(n);
	put_char('\n');
	for (unsigned i = 0; i < n; i++) {
		struct e820_entry e = e820_get(bp, i);
		put_str("e820: addr=");
		put_hex(e.addr);
		put_str(" size=");
		put_hex(e.size);
		put_str(" type=");
		put_dec(e.type);
		put_char('\n');
	}
	put_str("bootinfo: done\n");
	guest_exit();
}
