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
 * Parameters (key=value): file_mib (default 64), file_dev (default none),
 * fill, seed as in common.h (tmpfs case only).
 *
 * Lines:
 *   event=filecache_start mib=M path=PATH reclaimable=0|1
 *   event=filecache_done mib=M path=PATH reclaimable=0|1 io_s=T
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

/* Read up to `mib` MiB (0: to the end); returns whole MiB read or -1 with errno. */
static long read_dev(int fd, long mib)
{
	static char buf[1 << 20];
	size_t want = (size_t)mib * MIB, done = 0;

	while (mib == 0 || done < want) {
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
	long mib, done;
	enum fill fill;

	if (param_long(argc, argv, "file_mib", 64, &mib) < 0 || param_fill(argc, argv, &fill) < 0)
		return 2;
	if (mib < 0 || (mib == 0 && dev == NULL)) {
		say("event=error workload=filecache what=bad_param key=file_mib value=%ld", mib);
		return 2;
	}
	say("event=filecache_start mib=%ld path=%s reclaimable=%d", mib, path, reclaimable);
	double t0 = now_s();
	if (dev != NULL) {
		int fd = open_dev(dev);

		if (fd < 0) {
			say_errno("open", errno);
			return 1;
		}
		done = read_dev(fd, mib);
	} else {
		done = write_tmpfs(mib, fill, param_seed(argc, argv));
	}
	if (done < 0) {
		say_errno(dev != NULL ? "read" : "write", errno);
		return 1;
	}
	say("event=filecache_done mib=%ld path=%s reclaimable=%d io_s=%.2f",
	    done, path, reclaimable, now_s() - t0);
	if (dev != NULL) {
		for (;;)
			pause(); /* holding the device open holds its cache */
	}
	return 0;
}
