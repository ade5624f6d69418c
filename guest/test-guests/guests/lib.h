/* Shared runtime for the kata-snap test guests.
 *
 * Boot contract (Linux x86-64 64-bit boot protocol, see ../README.md):
 * entered in long mode with an identity map of 0..4 GiB, interrupts off,
 * RSI = guest-physical address of the boot_params zero page. start.S sets
 * up a stack in .bss, clears .bss and calls guest_main(boot_params).
 */
#ifndef TEST_GUESTS_LIB_H
#define TEST_GUESTS_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

_Static_assert(sizeof(u64) == 8, "u64");
_Static_assert(sizeof(usize) == 8, "usize");

/* I/O ports used by the guests. */
#define COM1_PORT 0x3f8
#define COM1_LSR (COM1_PORT + 5)
#define LSR_THR_EMPTY 0x20
#define SIGNAL_PORT 0xf4
#define SIGNAL_READY 1
#define I8042_CMD_PORT 0x64
#define I8042_CMD_RESET 0xfe

/* boot_params (zero page) offsets, see Documentation/arch/x86/zero-page.rst
 * and boot.rst in the Linux tree. */
#define BP_EXT_CMD_LINE_PTR 0x0c8 /* u32: upper 32 bits of cmd_line_ptr */
#define BP_E820_ENTRIES 0x1e8     /* u8 */
#define BP_HDR_CMD_LINE_PTR 0x228 /* u32 (setup header at 0x1f1) */
#define BP_HDR_CMDLINE_SIZE 0x238 /* u32 */
#define BP_E820_TABLE 0x2d0       /* 128 x 20-byte packed entries */
#define E820_MAX_ENTRIES 128
#define E820_ENTRY_SIZE 20
#define E820_TYPE_RAM 1

/* Largest cmdline the guests will read when the VMM leaves cmdline_size 0. */
#define CMDLINE_MAX 4096

/* Everything guest-physical above this is outside the identity map. */
#define IDENTITY_MAP_END 0x100000000ULL

static inline void outb(u16 port, u8 val)
{
	/* "memory": all earlier stores are in guest RAM before the exit, so a
	 * snapshot taken at this exit sees them. */
	__asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port) : "memory");
}

static inline u8 inb(u16 port)
{
	u8 val;
	__asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port) : "memory");
	return val;
}

static inline u64 rotl64(u64 x, unsigned r)
{
	return (x << r) | (x >> ((64 - r) & 63));
}

/* Serial input (COM1): waits for one byte (LSR data ready) and returns it. */
u8 serial_getc(void);

/* Serial output (COM1). */
void put_char(char c);
void put_str(const char *s);
void put_hex(u64 v); /* "0x" + lowercase hex, no padding */
void put_dec(u64 v);

/* Guest signal port 0xf4: write READY (1). */
void signal_ready(void);

/* i8042 reset (0xFE to port 0x64), then cli;hlt forever. */
__attribute__((noreturn)) void guest_exit(void);

/* cli;hlt forever (no reset). */
__attribute__((noreturn)) void halt_forever(void);

/* One e820 entry, read field by field from the packed table. */
struct e820_entry {
	u64 addr;
	u64 size;
	u32 type;
};

/* Number of e820 entries as reported by the zero page (may exceed 128 on a
 * broken VMM; callers bounds-check). */
unsigned e820_count(const u8 *bp);
struct e820_entry e820_get(const u8 *bp, unsigned i);
/* 1 if [start, end) is entirely covered by e820 type-1 (RAM) entries. */
int e820_range_is_ram(const u8 *bp, u64 start, u64 end);

/* Kernel command line: pointer (NULL if absent or outside the identity map)
 * and length (up to the NUL, bounded by hdr.cmdline_size when nonzero and by
 * CMDLINE_MAX). */
const char *cmdline_get(const u8 *bp, usize *len);

/* Looks up `key=<decimal>` as a whitespace-separated word of the cmdline.
 * The last occurrence wins. Returns `def` if the key is absent or its value
 * does not start with a digit; saturates at 2^64-1 on overflow. Parsing stops
 * at the first non-digit. */
u64 cmdline_u64(const u8 *bp, const char *key, u64 def);
/* 1 if `key=` occurs as a word of the cmdline. */
int cmdline_has(const u8 *bp, const char *key);

/* Provided because gcc may emit calls to them even with -ffreestanding. */
void *memset(void *dst, int c, usize n);
void *memcpy(void *dst, const void *src, usize n);
void *memmove(void *dst, const void *src, usize n);
int memcmp(const void *a, const void *b, usize n);

/* Each guest defines this; called by start.S with the zero page address. */
void guest_main(const u8 *boot_params);

#endif
