/* Shared runtime for the kata-snap test guests: serial output, exit, signal
 * port, boot_params (zero page) parsing. Kept tiny: every instruction costs
 * about 1 us under emulation. */
#include "lib.h"

/* Bound on LSR polls per byte so a missing/broken UART cannot hang a guest
 * forever (each poll is a VM exit). */
#define LSR_POLL_LIMIT 100000

u8 serial_getc(void)
{
	while (!(inb(COM1_LSR) & 0x01))
		;
	return inb(COM1_PORT);
}

void put_char(char c)
{
	for (unsigned i = 0; i < LSR_POLL_LIMIT; i++) {
		if (inb(COM1_LSR) & LSR_THR_EMPTY)
			break;
	}
	outb(COM1_PORT, (u8)c);
}

void put_str(const char *s)
{
	while (*s)
		put_char(*s++);
}

void put_hex(u64 v)
{
	char buf[16];
	int n = 0;

	put_char('0');
	put_char('x');
	do {
		unsigned d = (unsigned)(v & 0xf);
		buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v >>= 4;
	} while (v);
	while (n)
		put_char(buf[--n]);
}

void put_dec(u64 v)
{
	char buf[20];
	int n = 0;

	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		put_char(buf[--n]);
}

void signal_ready(void)
{
	outb(SIGNAL_PORT, SIGNAL_READY);
}

__attribute__((noreturn)) void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt" : : : "memory");
}

__attribute__((noreturn)) void guest_exit(void)
{
	outb(I8042_CMD_PORT, I8042_CMD_RESET);
	halt_forever();
}

/* Unaligned little-endian loads from the zero page. */
typedef struct {
	u64 v;
} __attribute__((packed)) unaligned_u64;
typedef struct {
	u32 v;
} __attribute__((packed)) unaligned_u32;

static u64 rd64(const u8 *p)
{
	return ((const unaligned_u64 *)p)->v;
}

static u32 rd32(const u8 *p)
{
	return ((const unaligned_u32 *)p)->v;
}

unsigned e820_count(const u8 *bp)
{
	return bp[BP_E820_ENTRIES];
}

struct e820_entry e820_get(const u8 *bp, unsigned i)
{
	const u8 *e = bp + BP_E820_TABLE + (usize)i * E820_ENTRY_SIZE;
	struct e820_entry r;

	r.addr = rd64(e);
	r.size = rd64(e + 8);
	r.type = rd32(e + 16);
	return r;
}

int e820_range_is_ram(const u8 *bp, u64 start, u64 end)
{
	unsigned n = e820_count(bp);
	u64 cur = start;

	if (n > E820_MAX_ENTRIES)
		return 0;
	/* Each pass advances `cur` to the end of a RAM entry containing it, so
	 * adjacent RAM entries may together cover the range. */
	while (cur < end) {
		u64 next = cur;
		for (unsigned i = 0; i < n; i++) {
			struct e820_entry e = e820_get(bp, i);
			u64 e_end = e.addr + e.size;
			if (e.type != E820_TYPE_RAM || e_end < e.addr)
				continue;
			if (e.addr <= cur && cur < e_end && e_end > next)
				next = e_end;
		}
		if (next == cur)
			return 0;
		cur = next;
	}
	return 1;
}

const char *cmdline_get(const u8 *bp, usize *len)
{
	u64 ptr = (u64)rd32(bp + BP_HDR_CMD_LINE_PTR) |
		  ((u64)rd32(bp + BP_EXT_CMD_LINE_PTR) << 32);
	u64 max = rd32(bp + BP_HDR_CMDLINE_SIZE);
	const char *s;
	usize n = 0;

	*len = 0;
	if (max == 0 || max > CMDLINE_MAX)
		max = CMDLINE_MAX;
	if (ptr == 0 || ptr >= IDENTITY_MAP_END - max)
		return 0;
	s = (const char *)(usize)ptr;
	while (n < max && s[n])
		n++;
	*len = n;
	return s;
}

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Finds the value of the last `key=` word; returns its start or NULL. The
 * value ends at whitespace or at `end`. */
static const char *cmdline_find(const u8 *bp, const char *key,
				const char **end)
{
	usize len;
	const char *s = cmdline_get(bp, &len);
	const char *found = 0;
	usize i = 0;

	*end = 0;
	if (!s)
		return 0;
	while (i < len) {
		while (i < len && is_space(s[i]))
			i++;
		/* s[i] starts a word: compare it with `key=`. */
		usize k = 0;
		while (key[k] && i + k < len && s[i + k] == key[k])
			k++;
		if (!key[k] && i + k < len && s[i + k] == '=')
			found = s + i + k + 1;
		while (i < len && !is_space(s[i]))
			i++;
	}
	*end = s + len;
	return found;
}

int cmdline_has(const u8 *bp, const char *key)
{
	const char *end;
	return cmdline_find(bp, key, &end) != 0;
}

u64 cmdline_u64(const u8 *bp, const char *key, u64 def)
{
	const char *end;
	const char *p = cmdline_find(bp, key, &end);
	u64 v = 0;

	if (!p || p >= end || *p < '0' || *p > '9')
		return def;
	for (; p < end && *p >= '0' && *p <= '9'; p++) {
		u64 d = (u64)(*p - '0');
		if (v > (~0ULL - d) / 10)
			return ~0ULL;
		v = v * 10 + d;
	}
	return v;
}

void *memset(void *dst, int c, usize n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, usize n)
{
	u8 *d = dst;
	const u8 *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, usize n)
{
	u8 *d = dst;
	const u8 *s = src;
	if (d < s) {
		while (n--)
			*d++ = *s++;
	} else {
		while (n--)
			d[n] = s[n];
	}
	return dst;
}

int memcmp(const void *a, const void *b, usize n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++) {
		if (*x != *y)
			return *x < *y ? -1 : 1;
	}
	return 0;
}
