/*
 * echo: the smallest useful job, for tests of the stdin/stdout/argv/exit-code
 * plumbing.
 *
 *   - copies stdin to stdout verbatim;
 *   - then, if arguments are given, prints argv[1..] joined by single spaces
 *     and a newline;
 *   - if the first two arguments are `--exit N`, they are not printed and the
 *     module exits with code N;
 *   - writes "echo: done\n" to stderr, so tests can check stderr capture.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    char buf[64 * 1024];
    size_t n;
    int exit_code = 0;
    int first = 1;

    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
        if (fwrite(buf, 1, n, stdout) != n) {
            return 1;
        }
    }

    if (argc >= 3 && strcmp(argv[1], "--exit") == 0) {
        exit_code = atoi(argv[2]);
        first = 3;
    }
    if (first < argc) {
        for (int i = first; i < argc; i++) {
            if (i > first) {
                fputc(' ', stdout);
            }
            fputs(argv[i], stdout);
        }
        fputc('\n', stdout);
    }

    fflush(stdout);
    fputs("echo: done\n", stderr);
    return exit_code;
}
