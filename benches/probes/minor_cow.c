/*
 * Probe for issue 15: can a template held in shared memory (memfd) be restored lazily with
 * userfaultfd MINOR faults + UFFDIO_CONTINUE while each clone's writes stay private (MAP_PRIVATE,
 * copy-on-write)? And what does a minor fault cost against plain page-cache faults of a private
 * file mapping (what `mmap` mode gets)?
 *
 * Build and run: gcc -O2 -pthread -o /tmp/minor_cow benches/probes/minor_cow.c && /tmp/minor_cow
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024)
#define SIZE (64 * MIB)
#define PAGE 4096UL

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int uffd;
static volatile int done;
static long served;

static void *handler(void *arg)
{
	(void)arg;
	struct pollfd p = { .fd = uffd, .events = POLLIN };
	while (!done) {
		if (poll(&p, 1, 10) <= 0)
			continue;
		struct uffd_msg m;
		if (read(uffd, &m, sizeof m) != sizeof m)
			continue;
		if (m.event != UFFD_EVENT_PAGEFAULT)
			continue;
		struct uffdio_continue c = {
			.range = { .start = m.arg.pagefault.address & ~(PAGE - 1), .len = PAGE },
		};
		if (ioctl(uffd, UFFDIO_CONTINUE, &c) && errno != EEXIST) {
			perror("UFFDIO_CONTINUE");
			exit(1);
		}
		served++;
	}
	return NULL;
}

static double touch(volatile uint8_t *a, int write)
{
	double t0 = now_ms();
	for (unsigned long off = 0; off < SIZE; off += PAGE) {
		if (write)
			a[off] = 0xee;
		else
			(void)a[off];
	}
	return now_ms() - t0;
}

int main(void)
{
	int mfd = memfd_create("template", MFD_CLOEXEC);
	if (mfd < 0 || ftruncate(mfd, SIZE)) {
		perror("memfd");
		return 1;
	}
	uint8_t *fill = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	for (unsigned long off = 0; off < SIZE; off += PAGE)
		memset(fill + off, (int)(off / PAGE) & 0xff, PAGE);

	/* Baseline: a private mapping of the template, page-cache faults (what `mmap` mode does). */
	uint8_t *plain = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
	double plain_read = touch(plain, 0);

	/* MINOR faults on a private mapping of the same memfd. */
	uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_MINOR_SHMEM };
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) {
		printf("userfaultfd with UFFD_FEATURE_MINOR_SHMEM: not available (%s)\n", strerror(errno));
		return 0;
	}
	uint8_t *lazy = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
	struct uffdio_register reg = {
		.range = { .start = (unsigned long)lazy, .len = SIZE },
		.mode = UFFDIO_REGISTER_MODE_MINOR,
	};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg)) {
		printf("MINOR registration of a MAP_PRIVATE memfd mapping: refused (%s)\n",
		       strerror(errno));
		/* The shared case, for the record: writes would reach the template. */
		uint8_t *shared = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
		reg.range.start = (unsigned long)shared;
		printf("MINOR registration of a MAP_SHARED memfd mapping: %s\n",
		       ioctl(uffd, UFFDIO_REGISTER, &reg) ? strerror(errno) : "accepted");
		return 0;
	}
	pthread_t th;
	pthread_create(&th, NULL, handler, NULL);
	double lazy_read = touch(lazy, 0);
	long read_faults = served;
	double lazy_write = touch(lazy, 1);
	done = 1;
	pthread_join(th, NULL);
	int template_intact = 1;
	for (unsigned long off = 0; off < SIZE; off += PAGE)
		if (fill[off] != (uint8_t)((off / PAGE) & 0xff))
			template_intact = 0;
	printf("pages: %lu (64 MiB)\n", SIZE / PAGE);
	printf("private page-cache mapping, first read of every page: %.2f ms (%.2f us/page)\n",
	       plain_read, plain_read * 1e3 / (SIZE / PAGE));
	printf("MINOR + UFFDIO_CONTINUE on a private mapping, first read: %.2f ms (%.2f us/page), %ld faults served\n",
	       lazy_read, lazy_read * 1e3 / (SIZE / PAGE), read_faults);
	printf("then a write to every page (copy-on-write): %.2f ms; template unchanged: %s\n",
	       lazy_write, template_intact ? "yes" : "NO");
	return template_intact ? 0 : 2;
}
