/* bench-trap: round trips of guest accesses that the VMM must trap, on a passed-through PCI function.
 *
 *   bench-trap BDF SECONDS
 *
 * cfg:  reads of one config-space dword through /sys/bus/pci/devices/BDF/config (pread). Offset 0x100
 *       when the function has extended config space, so the kernel uses the ECAM window (one MMIO exit
 *       per read); otherwise offset 0x04 through the 0xCF8/0xCFC ports.
 * msix: 32-bit writes to the Message Data word of the function's last MSI-X table entry, through an
 *       mmap of /sys/bus/pci/devices/BDF/resourceN (the function's driver must be unbound: the kernel
 *       refuses to map a BAR a driver holds). The entry is unused and stays masked.
 * Each test runs for SECONDS of the guest's clock and prints (one write(2) per line) NL0..NL3 (console
 * cost), START, END, then STATS with the count; the harness times START..END with the lab's clock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static void say(const char *tag, const char *fmt, ...) {
    char line[256];
    int n = snprintf(line, sizeof line, "BENCH %s ", tag);
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - n, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof line - 1) n = sizeof line - 2;
    line[n++] = '\n';
    if (write(1, line, n) < 0) exit(3);
    tcdrain(1); /* the line has left the serial port before the helper goes on */
}

static void die(const char *tag, const char *what) {
    say(tag, "ERROR %s: %s", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static uint32_t cfg_read(int fd, off_t off, int size) {
    uint32_t v = 0;
    if (pread(fd, &v, size, off) != size) return 0xffffffff;
    return v;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: bench-trap BDF SECONDS\n");
        return 2;
    }
    const char *bdf = argv[1];
    uint64_t budget = (uint64_t)(atof(argv[2]) * 1e9);
    char path[256];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/config", bdf);
    int cfg = open(path, O_RDWR);
    if (cfg < 0) die("cfg", "open config");
    struct stat st;
    if (fstat(cfg, &st) < 0) die("cfg", "fstat config");

    /* config-space reads */
    off_t off = st.st_size >= 4096 ? 0x100 : 0x04;
    uint32_t v = 0;
    uint64_t n = 0;
    for (int i = 0; i < 4; i++) say("cfg", "NL%d", i);
    say("cfg", "START");
    uint64_t t0 = now_ns(), t1;
    do {
        for (int i = 0; i < 16; i++) {
            if (pread(cfg, &v, 4, off) != 4) die("cfg", "pread config");
        }
        n += 16;
    } while ((t1 = now_ns()) - t0 < budget);
    say("cfg", "END");
    say("cfg", "STATS ios=%llu offset=0x%x guest_ns=%llu", (unsigned long long)n, (unsigned)off,
        (unsigned long long)(t1 - t0));

    /* MSI-X table writes: find the capability */
    unsigned pos = cfg_read(cfg, 0x34, 1) & 0xfc;
    unsigned ctrl = 0, table = 0;
    for (int guard = 0; pos && guard < 48; guard++) {
        uint32_t hdr = cfg_read(cfg, pos, 4);
        if ((hdr & 0xff) == 0x11) {
            ctrl = hdr >> 16;
            table = cfg_read(cfg, pos + 4, 4);
            break;
        }
        pos = (hdr >> 8) & 0xfc;
    }
    if (!table && !ctrl) {
        errno = ENOENT;
        die("msix", "no MSI-X capability");
    }
    unsigned bir = table & 7, entries = (ctrl & 0x7ff) + 1;
    uint64_t table_off = table & ~7u;
    uint16_t cmd = cfg_read(cfg, 4, 2);
    if (!(cmd & 2)) { /* memory space enable, in case unbinding the driver cleared it */
        cmd |= 2;
        if (pwrite(cfg, &cmd, 2, 4) != 2) die("msix", "enable memory space");
    }
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/resource%u", bdf, bir);
    int res = open(path, O_RDWR | O_SYNC);
    if (res < 0) die("msix", "open resource");
    long page = sysconf(_SC_PAGESIZE);
    uint64_t entry = table_off + (uint64_t)(entries - 1) * 16;
    uint64_t map_off = entry & ~(uint64_t)(page - 1);
    volatile uint8_t *map = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, res, map_off);
    if (map == MAP_FAILED) die("msix", "mmap resource");
    volatile uint32_t *data = (volatile uint32_t *)(map + (entry - map_off) + 8);
    volatile uint32_t *vctl = (volatile uint32_t *)(map + (entry - map_off) + 12);
    if (!(*vctl & 1)) {
        errno = EBUSY;
        die("msix", "last MSI-X entry is not masked");
    }
    n = 0;
    for (int i = 0; i < 4; i++) say("msix", "NL%d", i);
    say("msix", "START");
    t0 = now_ns();
    do {
        for (int i = 0; i < 16; i++) *data = (uint32_t)(n + i);
        n += 16;
    } while ((t1 = now_ns()) - t0 < budget);
    say("msix", "END");
    say("msix", "STATS ios=%llu entry=%u bar=%u guest_ns=%llu", (unsigned long long)n, entries - 1, bir,
        (unsigned long long)(t1 - t0));
    return 0;
}
