/* pyvmm-vsock: the test guests' AF_VSOCK tool (busybox has none). Built static by the lab asset builder.
 *
 *   pyvmm-vsock listen PORT        accept connections one after another and echo each back until EOF
 *   pyvmm-vsock connect CID PORT   connect, copy stdin to the socket (then shut down its write side) and
 *                                  the socket to stdout until EOF
 *
 * Exit status 0 on success, 1 with a message on stderr otherwise.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int fail(const char *what)
{
	fprintf(stderr, "pyvmm-vsock: %s: %s\n", what, strerror(errno));
	return 1;
}

static unsigned int number(const char *text)
{
	char *end;
	unsigned long value = strtoul(text, &end, 10);

	if (*text == '\0' || *end != '\0' || value > 0xFFFFFFFFUL) {
		fprintf(stderr, "pyvmm-vsock: %s is not a number\n", text);
		exit(2);
	}
	return (unsigned int)value;
}

static int write_all(int fd, const char *buf, ssize_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= n;
	}
	return 0;
}

static void echo(int fd)
{
	char buf[4096];
	ssize_t n;

	while ((n = read(fd, buf, sizeof(buf))) > 0 || (n < 0 && errno == EINTR))
		if (n > 0 && write_all(fd, buf, n) < 0)
			break;
}

static int listen_on(unsigned int port)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);

	if (fd < 0)
		return fail("socket");
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return fail("bind");
	if (listen(fd, 64) < 0)
		return fail("listen");
	printf("pyvmm-vsock: listening on port %u\n", port);
	fflush(stdout);
	for (;;) {
		int conn = accept(fd, NULL, NULL);

		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			return fail("accept");
		}
		echo(conn);
		close(conn);
	}
}

static int connect_to(unsigned int cid, unsigned int port)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
	struct pollfd fds[2];
	char buf[4096];
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	int input_open = 1;

	if (fd < 0)
		return fail("socket");
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return fail("connect");
	fds[0].fd = STDIN_FILENO;
	fds[1].fd = fd;
	fds[1].events = POLLIN;
	for (;;) {
		ssize_t n;

		fds[0].events = input_open ? POLLIN : 0;
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return fail("poll");
		}
		if (input_open && fds[0].revents) {
			n = read(STDIN_FILENO, buf, sizeof(buf));
			if (n <= 0) {
				input_open = 0;
				fds[0].fd = -1;
				shutdown(fd, SHUT_WR);
			} else if (write_all(fd, buf, n) < 0) {
				return fail("send");
			}
		}
		if (fds[1].revents) {
			n = read(fd, buf, sizeof(buf));
			if (n < 0)
				return fail("recv");
			if (n == 0)
				break;
			if (write_all(STDOUT_FILENO, buf, n) < 0)
				return fail("write");
		}
	}
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "listen") == 0)
		return listen_on(number(argv[2]));
	if (argc == 4 && strcmp(argv[1], "connect") == 0)
		return connect_to(number(argv[2]), number(argv[3]));
	fprintf(stderr, "usage: pyvmm-vsock listen PORT | pyvmm-vsock connect CID PORT\n");
	return 2;
}
