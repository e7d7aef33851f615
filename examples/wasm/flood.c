/*
 * flood: a hostile module for tests. It writes a 64 KiB buffer to stdout
 * forever and ignores write errors, so the gateway's output-size cap and
 * CPU-time limit must stop it; it never exits on its own.
 */
#include <string.h>
#include <unistd.h>

#define BUF_BYTES (64 * 1024)

static char buf[BUF_BYTES];

int main(void) {
    memset(buf, 'x', sizeof buf);
    for (;;) {
        (void)write(STDOUT_FILENO, buf, sizeof buf);
    }
}
