/* bench-net: TCP throughput and request/response rate for pyvmm's benchmark. The guest runs the server,
 * the lab runs the client (the same static binary: the lab sees the host's files), so every figure is
 * timed by the client's clock, which is the lab's.
 *
 *   bench-net serve PORT SECONDS        (guest) print `BENCH net READY` once listening, then serve
 *                                       connections until a `Q` one, or until SECONDS have passed
 *   bench-net TAG HOST PORT MODE SECONDS (lab)  one measurement of MODE for SECONDS, then one line:
 *       BENCH TAG STATS ios=N bytes=N ns=N
 *
 * The client's first byte says what the connection is for:
 *   T  the guest transmits: the server writes until the client closes; the client counts what it reads
 *      from its first read on (the connection's set-up is not counted) until SECONDS have passed.
 *   R  the guest receives: the client writes for SECONDS and shuts its side down; the server answers
 *      with the byte count it read (8 bytes), and the span ends when that answer arrives, so only bytes
 *      that reached the guest count, and all of them.
 *   P  ping-pong: 1 byte each way in turn over this one connection (TCP_NODELAY on both ends), as
 *      netperf's TCP_RR; ios counts the round trips.
 *   Q  the server exits 0.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256u << 10)

static char buffer[CHUNK];

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void die(const char *tag, const char *what) {
    printf("BENCH %s ERROR %s: %s\n", tag, what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static int read_full(int fd, void *p, size_t n) {
    for (size_t done = 0; done < n;) {
        ssize_t r = read(fd, (char *)p + done, n - done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += r;
    }
    return 0;
}

static int write_full(int fd, const void *p, size_t n) {
    for (size_t done = 0; done < n;) {
        ssize_t r = write(fd, (const char *)p + done, n - done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += r;
    }
    return 0;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* One connection of the server; returns 1 on `Q`. */
static int serve_one(int c) {
    char mode;
    if (read_full(c, &mode, 1) < 0) return 0;
    if (mode == 'Q') return 1;
    if (mode == 'T') {
        while (write_full(c, buffer, CHUNK) == 0) {
        }
    } else if (mode == 'R') {
        uint64_t got = 0;
        ssize_t r;
        while ((r = read(c, buffer, CHUNK)) > 0 || (r < 0 && errno == EINTR))
            if (r > 0) got += r;
        write_full(c, &got, sizeof got);
    } else if (mode == 'P') {
        nodelay(c);
        char b;
        while (read_full(c, &b, 1) == 0 && write_full(c, &b, 1) == 0) {
        }
    }
    return 0;
}

static int serve(int port, unsigned seconds) {
    signal(SIGPIPE, SIG_IGN);
    alarm(seconds); /* a lab side that never comes does not keep the guest up */
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (s < 0) die("net", "socket");
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = INADDR_ANY};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) die("net", "bind");
    if (listen(s, 4) < 0) die("net", "listen");
    printf("BENCH net READY\n"); /* the lab's side may connect from now on */
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR) continue;
            die("net", "accept");
        }
        int quit = serve_one(c);
        close(c);
        if (quit) return 0;
    }
}

int main(int argc, char **argv) {
    memset(buffer, 0x5a, sizeof buffer);
    if (argc == 4 && !strcmp(argv[1], "serve")) return serve(atoi(argv[2]), (unsigned)atoi(argv[3]));
    if (argc != 6 || strlen(argv[4]) != 1 || !strchr("TRPQ", argv[4][0])) {
        fprintf(stderr, "usage: bench-net serve PORT SECONDS | bench-net TAG HOST PORT T|R|P|Q SECONDS\n");
        return 2;
    }
    const char *tag = argv[1];
    char mode = argv[4][0];
    uint64_t budget = (uint64_t)(atof(argv[5]) * 1e9);
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    if (inet_pton(AF_INET, argv[2], &a.sin_addr) != 1) return 2;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) die(tag, "socket");
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) die(tag, "connect");
    if (mode == 'P') nodelay(s);
    if (write_full(s, &mode, 1) < 0) die(tag, "write mode");
    uint64_t ios = 0, bytes = 0, t0 = now_ns(), t1 = t0;
    if (mode == 'T') {
        ssize_t r;
        do r = read(s, buffer, CHUNK);
        while (r < 0 && errno == EINTR);
        if (r <= 0) die(tag, "first read");
        t0 = t1 = now_ns(); /* from the first data on */
        while (t1 - t0 < budget) {
            r = read(s, buffer, CHUNK);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) die(tag, "read");
            bytes += r;
            ios++;
            t1 = now_ns();
        }
    } else if (mode == 'R') {
        while (now_ns() - t0 < budget) {
            if (write_full(s, buffer, CHUNK) < 0) die(tag, "write");
            bytes += CHUNK;
            ios++;
        }
        if (shutdown(s, SHUT_WR) < 0) die(tag, "shutdown");
        uint64_t got;
        if (read_full(s, &got, sizeof got) < 0) die(tag, "read the guest's count");
        t1 = now_ns();
        if (got != bytes) {
            errno = EIO;
            die(tag, "the guest's count differs from what was sent");
        }
    } else if (mode == 'P') {
        char b = 'x';
        while (t1 - t0 < budget) {
            if (write_full(s, &b, 1) < 0 || read_full(s, &b, 1) < 0) die(tag, "ping-pong");
            ios++;
            t1 = now_ns();
        }
        bytes = 2 * ios;
    }
    close(s);
    printf("BENCH %s STATS ios=%llu bytes=%llu ns=%llu\n", tag, (unsigned long long)ios,
           (unsigned long long)bytes, (unsigned long long)(t1 - t0));
    return 0;
}
