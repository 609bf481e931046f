/* bench-io: block-device I/O for pyvmm's benchmark, run inside guests and in the lab itself.
 *
 *   bench-io TAG DEVICE MODE BLOCK QDEPTH SPAN OFFSET SECONDS
 *
 * MODE is read or write (sequential BLOCK-sized requests over SPAN bytes from OFFSET, starting over at
 * OFFSET after the end) or randread (BLOCK-aligned random offsets inside [OFFSET, OFFSET+SPAN)). It runs
 * for SECONDS of the guest's clock, or with SECONDS 0 for one sequential pass over SPAN. Every request is
 * O_DIRECT and goes through Linux AIO (io_setup/io_submit/io_getevents as raw syscalls) with QDEPTH
 * requests in flight.
 *
 * BENCH_IO_BUFFER says where the data buffers are, which decides how many segments a request has on its
 * way through the guest's block layer and a virtqueue:
 *   unset  posix_memalign: 4 KiB pages as the guest's allocator hands them out, adjacent or not, so the
 *          count differs from one boot to the next (1 MiB reads came as 30 to 256 segments);
 *   huge   a hugetlb mapping (the guest needs `hugepages=`): a request of up to 2 MiB is one segment;
 *   pages  every 4 KiB of a request in its own segment (BLOCK/4096 iovecs, each a page apart).
 *
 * Console lines, each written with one write(2) and drained (tcdrain: the line has left the serial port
 * before the helper goes on, so queued console output neither overlaps nor delays the measured I/O):
 *   BENCH TAG NL0 .. BENCH TAG NL3   empty marker lines: their spacing is what one console line costs
 *   BENCH TAG START / BENCH TAG END  around the measured I/O (the harness timestamps them as they arrive)
 *   BENCH TAG STATS ios=N bytes=N guest_ns=N   the guest's own figures (secondary)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_QD 256
#define PAGE 4096
#define HUGE_PAGE (2u << 20)
#define MAX_PAGES (HUGE_PAGE / PAGE)

static const char *tag = "io";

static void say(const char *fmt, ...) {
    char line[256];
    int n = snprintf(line, sizeof line, "BENCH %s ", tag);
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - n, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof line - 1) n = sizeof line - 2;
    line[n++] = '\n';
    if (write(1, line, n) < 0) exit(3);
    tcdrain(1); /* fails harmlessly on a pipe */
}

static void die(const char *what) {
    say("ERROR %s: %s", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static uint64_t rng = 0x9e3779b97f4a7c15u;
static uint64_t next_random(void) { /* xorshift64 */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static uint64_t size_arg(const char *s) {
    char *end;
    uint64_t v = strtoull(s, &end, 0);
    switch (*end) {
    case 'K': return v << 10;
    case 'M': return v << 20;
    case 'G': return v << 30;
    default: return v;
    }
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: bench-io TAG DEVICE read|write|randread BLOCK QDEPTH SPAN OFFSET SECONDS\n");
        return 2;
    }
    tag = argv[1];
    const char *mode = argv[3];
    uint64_t block = size_arg(argv[4]), span = size_arg(argv[6]), offset = size_arg(argv[7]);
    int qd = atoi(argv[5]);
    double seconds = atof(argv[8]);
    int writing = !strcmp(mode, "write"), random_reads = !strcmp(mode, "randread");
    if (!writing && !random_reads && strcmp(mode, "read")) return 2;
    if (qd < 1 || qd > MAX_QD || block == 0 || block % 512 || span < block) return 2;

    int fd = open(argv[2], (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0) die("open");
    const char *layout = getenv("BENCH_IO_BUFFER");
    if (layout && !*layout) layout = NULL;
    int huge = layout && !strcmp(layout, "huge"), pages = layout && !strcmp(layout, "pages");
    if (layout && !huge && !pages) return 2;
    if ((huge || pages) && (block > HUGE_PAGE || block % PAGE)) return 2;
    static struct iovec iov[MAX_QD][MAX_PAGES];
    uint64_t stride = pages ? 2 * block : block; /* pages: every other page of the region is used */
    char *buffers;
    if (huge || pages) {
        uint64_t length = (stride * qd + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
        buffers = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
        if (buffers == MAP_FAILED) die("mmap MAP_HUGETLB (hugepages= on the guest's command line?)");
    } else if (posix_memalign((void **)&buffers, PAGE, block * qd)) {
        die("posix_memalign");
    }
    memset(buffers, writing ? 0x5a : 0, stride * qd);
    if (pages)
        for (int s = 0; s < qd; s++)
            for (uint64_t k = 0; k < block / PAGE; k++) {
                iov[s][k].iov_base = buffers + stride * s + 2 * PAGE * k;
                iov[s][k].iov_len = PAGE;
            }
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, qd, &ctx) < 0) die("io_setup");
    struct iocb iocbs[MAX_QD], *batch[MAX_QD];
    struct io_event events[MAX_QD];
    uint64_t blocks = span / block, issued = 0, done = 0, bytes = 0;
    uint64_t total = seconds > 0 ? UINT64_MAX : blocks;
    uint64_t deadline_ns = (uint64_t)(seconds * 1e9);

    for (int i = 0; i < 4; i++) say("NL%d", i);
    say("START");
    uint64_t t0 = now_ns(), t1;
    int inflight = 0, stop = 0, nfree = qd, free_slots[MAX_QD];
    for (int i = 0; i < qd; i++) free_slots[i] = i;
    for (;;) {
        int n = 0;
        while (!stop && nfree > 0 && issued < total) {
            int slot = free_slots[--nfree];
            struct iocb *cb = &iocbs[slot];
            memset(cb, 0, sizeof *cb);
            cb->aio_data = slot;
            cb->aio_fildes = fd;
            if (pages) {
                cb->aio_lio_opcode = writing ? IOCB_CMD_PWRITEV : IOCB_CMD_PREADV;
                cb->aio_buf = (uint64_t)(uintptr_t)iov[slot];
                cb->aio_nbytes = block / PAGE;
            } else {
                cb->aio_lio_opcode = writing ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
                cb->aio_buf = (uint64_t)(uintptr_t)(buffers + stride * slot);
                cb->aio_nbytes = block;
            }
            uint64_t index = random_reads ? next_random() % blocks : issued % blocks;
            cb->aio_offset = offset + index * block;
            batch[n++] = cb;
            issued++;
        }
        if (n > 0) {
            long r = syscall(SYS_io_submit, ctx, n, batch);
            if (r != n) die("io_submit");
            inflight += n;
        }
        if (inflight == 0) break;
        long got = syscall(SYS_io_getevents, ctx, 1, qd, events, NULL);
        if (got < 0) {
            if (errno == EINTR) continue;
            die("io_getevents");
        }
        for (long i = 0; i < got; i++) {
            if (events[i].res != (int64_t)block) {
                errno = events[i].res < 0 ? -events[i].res : EIO;
                die("short or failed I/O");
            }
            free_slots[nfree++] = (int)events[i].data;
            bytes += block;
        }
        done += got;
        inflight -= got;
        if (seconds > 0 && !stop && now_ns() - t0 >= deadline_ns) stop = 1;
    }
    t1 = now_ns();
    say("END");
    say("STATS ios=%llu bytes=%llu guest_ns=%llu", (unsigned long long)done, (unsigned long long)bytes,
        (unsigned long long)(t1 - t0));
    return 0;
}
