/* Default parameters of the test guests. src/lib.rs mirrors these values
 * (a unit test parses this file to keep them in sync): keep one
 * `#define NAME <decimal>ULL` per line. */
#ifndef TEST_GUESTS_PARAMS_H
#define TEST_GUESTS_PARAMS_H

#define MEMTOUCH_DEFAULT_TOUCH_MIB 8ULL
#define MEMTOUCH_DEFAULT_TOUCH_BASE_MIB 16ULL
#define COMPUTE_DEFAULT_ITERS 130000ULL
#define SPIN_DEFAULT_TICK_ITERS 28000ULL
#define PIO_DEFAULT_ITERS 10000ULL

#endif
