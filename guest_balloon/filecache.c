/*
 * filecache: fill the guest's page cache with file_mib MiB.
 *
 * With file_dev=PATH (a block device, e.g. /dev/vda from a virtio-blk disk) it
 * reads the first file_mib MiB of PATH (all of it if file_mib=0): clean page
 * cache ("Buffers" in /proc/meminfo) the guest can reclaim when ballooned.  It
 * then keeps the device open and sleeps, because the last close of a block
 * device drops its page cache.  Without file_dev it writes
 * file_mib MiB of fill content to /tmp/hv-filecache on the guest's tmpfs: page
 * cache too ("Cached" and "Shmem" in /proc/meminfo), but the guest has no swap,
 * so it cannot be reclaimed; the program then exits.
 *
 * With file_loop=1 (file_dev only) it then reads the same MiB again and again
 * instead of sleeping, a page-cache workload: its throughput is what of it the
 * cache holds.  With file_loop=2 it reads them as 1 MiB blocks at random (uniform,
 * from seed): what of the device the cache holds then sets the hit rate whatever
 * the cache's history, where a cyclic read of more than the cache holds misses on
 * every block under plain LRU but hits on what an older, larger cache left active.
 *
 * Parameters (key=value): file_mib (default 64), file_dev (default none),
 * file_loop (0, 1 or 2, default 0), fill, seed as in common.h (seed: also
 * file_loop=2's block order).
 *
 * Lines:
 *   event=filecache_start mib=M path=PATH reclaimable=0|1
 *   event=filecache_done mib=M path=PATH reclaimable=0|1 io_s=T
 *   event=filecache t_s=T read_mib=N passes=P     (file_loop=1 or 2: every second;
 *                                                  file_loop=2: passes = read_mib / MiB)
 *   event=error workload=filecache what=... errno=N
 */
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define TMPFS_PATH "/tmp/hv-filecache"
#define DEV_WAIT_S 5 /* a virtio disk's node can appear just after its driver loads */

static int open_dev(const char *path)
{
	double deadline = now_s() + DEV_WAIT_S;
	int fd;

	while ((fd = open(path, O_RDONLY)) < 0 && errno == ENOENT && now_s() < deadline)
		sleep_until(now_s() + 0.1);
	return fd;
}

/* Read up to `mib` MiB (0: to the end); returns whole MiB read or -1 with errno.
 * With `report`, says the running total (read_mib, MiB read before + now) every second. */
struct loop_report {
	double start, next;
	long read_mib, passes;
};

static long read_dev(int fd, long mib, struct loop_report *report)
{
	static char buf[1 << 20];
	size_t want = (size_t)mib * MIB, done = 0;

	while (mib == 0 || done < want) {
		if (report != NULL && now_s() >= report->next) {
			double now = now_s();

			say("event=filecache t_s=%.2f read_mib=%ld passes=%ld", now - report->start,
			    report->read_mib + (long)(done / MIB), report->passes);
			report->next = report->next + 1 > now ? report->next + 1 : now + 1;
		}
		size_t len = mib == 0 || want - done > sizeof(buf) ? sizeof(buf) : want - done;
		ssize_t n = read(fd, buf, len);

		if (n < 0)
			return -1;
		if (n == 0)
			break;
		done += (size_t)n;
	}
	return (long)(done / MIB);
}

static uint64_t mix(uint64_t x) /* splitmix64 */
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* file_loop=2: 1 MiB blocks of the first `mib` MiB at random, forever; -1 on error. */
static int read_random(int fd, long mib, uint64_t seed, struct loop_report *report)
{
	static char buf[1 << 20];

	for (uint64_t i = 0;; i++) {
		if (now_s() >= report->next) {
			double now = now_s();

			say("event=filecache t_s=%.2f read_mib=%ld passes=%ld", now - report->start,
			    report->read_mib, report->read_mib / mib);
			report->next = report->next + 1 > now ? report->next + 1 : now + 1;
		}
		off_t off = (off_t)(mix(seed + i) % (uint64_t)mib) * MIB;
		ssize_t n = pread(fd, buf, MIB, off);

		if (n < 0)
			return -1;
		report->read_mib += n / MIB;
	}
}

static long write_tmpfs(long mib, enum fill fill, uint64_t seed)
{
	int fd = open(TMPFS_PATH, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	char *chunk;

	if (fd < 0)
		return -1;
	for (long i = 0; i < mib; i++) {
		/* Each MiB gets its own seed so that no two chunks are equal. */
		chunk = alloc_filled(MIB, fill, seed + (uint64_t)i * 0x9e3779b97f4a7c15ULL);
		if (chunk == NULL || write(fd, chunk, MIB) != (ssize_t)MIB) {
			int err = chunk == NULL ? errno : (errno != 0 ? errno : ENOSPC);

			close(fd);
			errno = err;
			return -1;
		}
		munmap(chunk, MIB);
	}
	return close(fd) == 0 ? mib : -1;
}

int main(int argc, char **argv)
{
	const char *dev = param_str(argc, argv, "file_dev", NULL);
	const char *path = dev != NULL ? dev : TMPFS_PATH;
	int reclaimable = dev != NULL;
	long mib, done, loop;
	enum fill fill;
	int fd = -1;

	if (param_long(argc, argv, "file_mib", 64, &mib) < 0 || param_fill(argc, argv, &fill) < 0 ||
	    param_long(argc, argv, "file_loop", 0, &loop) < 0)
		return 2;
	if (mib < 0 || (mib == 0 && dev == NULL)) {
		say("event=error workload=filecache what=bad_param key=file_mib value=%ld", mib);
		return 2;
	}
	if (loop < 0 || loop > 2 || (loop && dev == NULL)) {
		say("event=error workload=filecache what=bad_param key=file_loop value=%ld", loop);
		return 2;
	}
	say("event=filecache_start mib=%ld path=%s reclaimable=%d", mib, path, reclaimable);
	double t0 = now_s();
	if (dev != NULL) {
		fd = open_dev(dev);
		if (fd < 0) {
			say_errno("open", errno);
			return 1;
		}
		done = read_dev(fd, mib, NULL);
	} else {
		done = write_tmpfs(mib, fill, param_seed(argc, argv));
	}
	if (done < 0) {
		say_errno(dev != NULL ? "read" : "write", errno);
		return 1;
	}
	say("event=filecache_done mib=%ld path=%s reclaimable=%d io_s=%.2f",
	    done, path, reclaimable, now_s() - t0);
	if (loop == 2 && done > 0) {
		struct loop_report report = { .start = now_s(), .next = now_s() + 1 };

		if (read_random(fd, done, param_seed(argc, argv), &report) < 0) {
			say_errno("read", errno);
			return 1;
		}
	}
	if (loop) {
		struct loop_report report = { .start = now_s(), .next = now_s() + 1 };

		for (;; report.passes++) {
			long got = lseek(fd, 0, SEEK_SET) < 0 ? -1 : read_dev(fd, done, &report);

			if (got < 0) {
				say_errno("read", errno);
				return 1;
			}
			report.read_mib += got;
		}
	}
	if (dev != NULL) {
		for (;;)
			pause(); /* holding the device open holds its cache */
	}
	return 0;
}
